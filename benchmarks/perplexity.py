"""Perplexity and resident weight bytes of the demo model under each weight quantization, by our runner.

Loads the demo GGUF (SmolLM2-135M-Instruct, Q4_1) through the loader's ModelStore
once per scheme, maps the shared-memory weights into a ModelRunner, and scores a
fixed text (benchmarks/data/python-license.txt: CPython's LICENSE, history and
licence texts, 3,823 tokens) as one sequence, fed in chunks of --chunk tokens
through the paged KV cache so every token sees all the tokens before it. The
same text through transformers (float32, one forward pass) checks the float32 row.

    python benchmarks/perplexity.py [--schemes none,gguf,int8,int4,fp8]

Resident bytes are the tensors in the loader's shared memory: what every runner on
the host maps, and what a GPU copy would hold.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from llmexec.demo_model import demo_model_path
from llmexec.loader.model_store import ModelStore
from llmexec.models.attention import AttentionMetadata
from llmexec.runner.model_runner import ModelRunner
from llmexec.runner.weight_attach import attach_weights
from llmexec.step import SequenceInput, StepInput

TEXT = Path(__file__).parent / "data" / "python-license.txt"
# (label, ModelStore.load keyword arguments)
SCHEMES = {
    "none": ("float32 (GGUF dequantized)", {}),
    "bf16": ("bfloat16", {"dtype": "bfloat16"}),
    "gguf": ("GGUF Q4_1 blocks kept (int4, group 32)", {"quantization": "gguf"}),
    "int8": ("int8 per channel", {"quantization": "int8"}),
    "int4": ("int4 group 128", {"quantization": "int4"}),
    "int4g32": ("int4 group 32", {"quantization": "int4", "quantization_group_size": 32}),
    "fp8": ("fp8 e4m3 per channel (weight-only on CPU)", {"quantization": "fp8"}),
}


def token_ids() -> list[int]:
    from transformers import AutoTokenizer

    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tokenizer(TEXT.read_text()).input_ids


def runner_nll(runner: ModelRunner, ids: list[int], chunk: int) -> float:
    """Mean negative log-likelihood of ids[1:], one sequence, `chunk` tokens per step."""
    block_size = runner.block_size
    block_table = list(range(-(-len(ids) // block_size)))
    total = 0.0
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        step = StepInput(
            input_ids=ids[start:end], positions=list(range(start, end)), slot_mapping=list(range(start, end)),
            sequences=[SequenceInput(query_len=end - start, seq_len=end, block_table=block_table, needs_sample=True)],
        )
        runner.validate(step)
        with torch.inference_mode():  # the runner's model and paged cache, every row's logits kept
            metadata = AttentionMetadata.build(step, block_size, runner.device)
            hidden = runner.model(torch.tensor(step.input_ids), torch.tensor(step.positions), metadata,
                                  runner.kv_caches)
            logprobs = runner.model.compute_logits(hidden).log_softmax(-1)
        targets = torch.tensor(ids[start + 1 : end + 1])
        total -= logprobs[: len(targets)].gather(1, targets[:, None]).sum().item()
    return total / (len(ids) - 1)


def transformers_nll(ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    ids = token_ids()
    print(f"text: {TEXT.name}, {len(ids)} tokens; demo model {demo_model_path().name}")
    rows = []
    for scheme in args.schemes.split(","):
        label, load = SCHEMES[scheme]
        started = time.perf_counter()
        store = ModelStore()  # one model at a time in /dev/shm
        try:
            model = store.load(str(demo_model_path()), **load)
            runner = ModelRunner(model.config, attach_weights(model.weights.layout), num_blocks=-(-len(ids) // 16),
                                 block_size=16)
            nll = runner_nll(runner, ids, args.chunk)
            resident = sum(model.weights.bytes_by_dtype.values())
        finally:
            store.close()
        rows.append((label, math.exp(nll), resident))
        print(f"{label:<44} perplexity {math.exp(nll):8.4f}  resident {resident / 2**20:7.1f} MiB  "
              f"{time.perf_counter() - started:5.1f}s", flush=True)
    reference = None if args.no_transformers else math.exp(transformers_nll(ids))
    if reference is not None:
        print(f"{'transformers float32 (same GGUF)':<44} perplexity {reference:8.4f}")
    base = rows[0][1]
    print("\n| scheme | perplexity | vs first row | resident weight bytes |\n|---|---:|---:|---:|")
    for label, ppl, resident in rows:
        print(f"| {label} | {ppl:.3f} | {ppl / base - 1:+.2%} | {resident:,} ({resident / 2**20:.1f} MiB) |")
    if reference is not None:
        print(f"| transformers float32, same GGUF (reference) | {reference:.3f} | {reference / base - 1:+.2%} | |")


if __name__ == "__main__":
    main()
