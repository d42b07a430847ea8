"""Issue 9 benchmark: tensor parallelism, TP=1 against TP=2, on a dummy Llama-3-8B-shaped model.

Runs the runner's own code: rank 0 is this process (a TensorParallelModelRunner), rank 1 a
worker process (llmexec.runner.tp_worker's loop) joined over NCCL; each rank's dummy weights
are its shard of the same full tensors (llmexec.loader.tp_plan), generated on its GPU with the
dummy format's per-name seeds, so TP=1 and TP=2 hold the same model.

  1. equality: float32 weights, a mixed batch (prefills, a chunked prompt, decodes) for a
     dozen steps: TP=2 logits against TP=1 (max abs and relative error) and greedy tokens;
  2. speed, bf16, eager and with CUDA graphs: batch-1 decode (128 in / 128 out) ms per token
     and batch-64 (512 in / 128 out) output tokens/s, at TP=1 and TP=2;
  3. the collectives' time per decode step at TP=2 (eager; CUDA events around each
     all-reduce and the logits all-gather, so a rank's wait for the other is included).

    bash scripts/gpu/run_tp.sh                       # on the 2-GPU machine; JSON to $OUT/tp_h200.json
    python benchmarks/bench_tp.py --tiny             # a tiny model on the CPU (gloo): checks the script

JSON is rewritten after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from llmexec.loader.config_tensors import config_tensor_specs
from llmexec.loader.dummy_checkpoint import dummy_tensor
from llmexec.loader.tp_plan import shard_plans
from llmexec.loader.weight_plan import fill_slice, plan_weights
from llmexec.models.parallel_layers import collective_seconds
from llmexec.models.registry import architecture_of, model_class_for
from llmexec.models.tensor_parallel import plan_for
from llmexec.runner.model_runner import GpuOptions, ModelRunner
from llmexec.runner.tp_runner import TensorParallelModelRunner
from llmexec.runner.tp_worker import WorkerRanks, rank_device
from llmexec.sampling_params import SamplingParams
from llmexec.step import SequenceInput, StepInput

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "initializer_range": 0.02,
}
TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024}
GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20)
BLOCK_SIZE = 16


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- weights: each rank's shard of the dummy model, made on its device


_weights_cache: dict[str, dict[str, torch.Tensor]] = {}


def dummy_rank_weights(config: dict, size: int, rank: int, device: str) -> dict[str, torch.Tensor]:
    """Rank `rank` of `size`'s shard: every checkpoint tensor generated whole on `device` (same name,
    same values on any rank), then cut by the loader's rank plan. Cached per config (one at a time)."""
    key = json.dumps([config, size, rank, device], sort_keys=True)
    if key in _weights_cache:
        return _weights_cache[key]
    _weights_cache.clear()
    gc.collect()
    model_class = model_class_for(architecture_of(config), config)
    specs = config_tensor_specs(config)
    plan = plan_weights(model_class, config, specs)
    if size > 1:
        plan = shard_plans(plan, plan_for(model_class, config, size), size)[rank]
    spec_of = {spec.name: spec for spec in specs}
    std = float(config.get("initializer_range", 0.02))
    weights = {}
    with torch.inference_mode():
        for target in plan:
            tensor = torch.zeros(target.shape, dtype=target.dtype, device=device)
            for source in target.sources:
                fill_slice(tensor, source, dummy_tensor(spec_of[source.name], std, device))
            weights[target.name] = tensor
    _weights_cache[key] = weights
    return weights


def build_worker_runner(setup, group) -> ModelRunner:
    """The worker's runner (rank >= 1): its dummy shard instead of the loader's shared memory."""
    device = rank_device(setup.device, group.rank)
    weights = dummy_rank_weights(setup.config, group.size, group.rank, device)
    return ModelRunner(setup.config, weights, setup.num_blocks, setup.block_size, device, tensor_parallel=group,
                       gpu=setup.gpu)


# -- a scheduler's part, in a few lines: sequences, their blocks, steps under a token budget


class Sequence:
    def __init__(self, token_ids: list[int], free_blocks: list[int]) -> None:
        self.token_ids, self.num_cached, self.block_table, self.free_blocks = list(token_ids), 0, [], free_blocks
        self.num_prompt = len(token_ids)

    def chunk(self, max_tokens: int) -> tuple[SequenceInput, list[int], list[int], list[int]]:
        start = self.num_cached
        end = min(len(self.token_ids), start + max_tokens)
        while len(self.block_table) * BLOCK_SIZE < end:
            self.block_table.append(self.free_blocks.pop())
        positions = list(range(start, end))
        slots = [self.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]
        self.num_cached = end
        seq = SequenceInput(end - start, end, list(self.block_table), end == len(self.token_ids), GREEDY,
                            len(self.token_ids) - self.num_prompt)
        return seq, self.token_ids[start:end], positions, slots


def make_step(chunks) -> StepInput:
    step = StepInput(input_ids=[], positions=[], slot_mapping=[], sequences=[])
    for seq, ids, positions, slots in chunks:
        step.sequences.append(seq)
        step.input_ids += ids
        step.positions += positions
        step.slot_mapping += slots
    return step


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=generator).tolist()


def run_step(runner, sequences: list[Sequence], budget: int) -> tuple[list[Sequence], list[int], torch.Tensor]:
    """One step: every unfinished prompt chunk that fits in `budget` tokens, else one decode token each."""
    chunks, members, used = [], [], 0
    for seq in sequences:
        remaining = len(seq.token_ids) - seq.num_cached
        take = min(remaining, budget - used)
        if take <= 0:
            continue
        chunks.append(seq.chunk(take))
        members.append(seq)
        used += take
    step = make_step(chunks)
    logits = runner.execute_logits(step)
    tokens = runner.sample_step(step, logits).sampled_token_ids
    sampled = [seq for seq, chunk in zip(members, chunks) if chunk[0].needs_sample]
    for seq, token in zip(sampled, tokens):
        seq.token_ids.append(token)
    return sampled, tokens, logits


def generate(runner, batch: int, prompt_len: int, new_tokens: int, vocab: int, budget: int, group=None) -> dict:
    """Prefill `batch` prompts (chunked under `budget`), then decode `new_tokens` - 1 steps; timings."""
    free = list(range(runner.num_blocks))
    sequences = [Sequence(p, free) for p in prompts(batch, prompt_len, vocab)]
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    while any(s.num_cached < s.num_prompt for s in sequences):
        run_step(runner, sequences, budget)
    prefill_seconds = time.perf_counter() - started
    step_seconds = []
    if group is not None:
        group.timings = []
    for _ in range(new_tokens - 1):
        begun = time.perf_counter()
        run_step(runner, sequences, budget)  # the token ids come back to the host: the step is done
        step_seconds.append(time.perf_counter() - begun)
    result = {
        "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "prefill_s": round(prefill_seconds, 4),
        "decode_ms_per_step_median": round(1e3 * sorted(step_seconds)[len(step_seconds) // 2], 3),
        "decode_ms_per_step_mean": round(1e3 * sum(step_seconds) / len(step_seconds), 3),
        "decode_output_tokens_per_s": round(batch * len(step_seconds) / sum(step_seconds), 1),
        "end_to_end_output_tokens_per_s": round(batch * new_tokens / (prefill_seconds + sum(step_seconds)), 1),
    }
    if group is not None:
        timings, group.timings = group.timings, None
        result["collective_ms_per_decode_step"] = round(1e3 * collective_seconds(timings) / len(step_seconds), 3)
        result["collectives_per_decode_step"] = len(timings) // len(step_seconds)
    return result


# -- the benchmark


class Results:
    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.data = path, {**header, "equality": None, "runs": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def equality_steps(runner, vocab: int, steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """A mixed batch: four prompts, one prefilled in two chunks, then decodes. Logits (on the CPU) and tokens."""
    free = list(range(runner.num_blocks))
    sequences = [Sequence(p[:n], free) for p, n in zip(prompts(4, 100, vocab, seed=7), (37, 100, 64, 5))]
    all_logits, all_tokens = [], []
    for _ in range(steps):
        _, tokens, logits = run_step(runner, sequences, budget=160)  # the 100-token prompt splits
        all_logits.append(logits.float().cpu())
        all_tokens.append(tokens)
    return all_logits, all_tokens


def make_runner(config: dict, size: int, ranks: WorkerRanks | None, device: str, num_blocks: int,
                graphs: int) -> ModelRunner:
    gpu = GpuOptions(cuda_graph_max_batch=graphs)
    weights = dummy_rank_weights(config, size, 0, rank_device(device, 0))
    if size == 1:
        return ModelRunner(config, weights, num_blocks, BLOCK_SIZE, rank_device(device, 0), gpu=gpu)
    return TensorParallelModelRunner.create(ranks, config, [], num_blocks, BLOCK_SIZE, device, gpu,
                                            rank0_weights=weights)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # rank >= 1, started by WorkerRanks.start
        from llmexec.runner.tp_worker import main as worker_main

        worker_main(sys.argv[2:], build_runner=build_worker_runner)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/tp_h200.json")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo): checks the script")
    p.add_argument("--time-budget", type=float, default=230.0, help="seconds; later measurements are skipped")
    p.add_argument("--no-graphs", action="store_true", help="eager only")
    args = p.parse_args()
    started = time.monotonic()
    device = "cpu" if args.tiny else "cuda"
    config = dict(TINY if args.tiny else LLAMA3_8B)
    vocab = config["vocab_size"]
    shapes = [(1, 16, 8), (4, 32, 8)] if args.tiny else [(1, 128, 128), (64, 512, 128)]
    budget = 256 if args.tiny else 8192
    num_blocks = 64 if args.tiny else 3072
    header = {
        "benchmark": "tensor parallelism TP=1 vs TP=2 (issue 9)", "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
        "torch": torch.__version__, "model": {k: config[k] for k in ("hidden_size", "num_hidden_layers",
                                                                       "num_attention_heads", "num_key_value_heads",
                                                                       "intermediate_size", "vocab_size")},
        "block_size": BLOCK_SIZE, "max_tokens_per_step": budget,
    }
    results = Results(Path(args.out), header)
    log(f"{header['gpu']}: starting rank 1")
    ranks = WorkerRanks.start(2, device, threads=1 if args.tiny else 0,
                              worker_command=[sys.executable, str(Path(__file__).resolve()), "--worker"])
    try:
        # 1. equality, float32
        f32 = {**config, "dtype": "float32"}
        equal_blocks = 64
        runs = {}
        for size in (1, 2):
            runner = make_runner(f32, size, ranks, device, equal_blocks, graphs=0)
            runs[size] = equality_steps(runner, vocab, steps=12)
            del runner
            release_memory()
            log(f"equality: TP={size} done")
        # Logits are comparable up to the first step whose tokens differ (after it the inputs differ).
        same = next((i for i, (a, b) in enumerate(zip(runs[1][1], runs[2][1])) if a != b), len(runs[1][1]))
        compared = range(min(same + 1, len(runs[1][0])))
        errors = [(runs[1][0][i] - runs[2][0][i]).abs().max().item() for i in compared]
        scale = max(runs[1][0][i].abs().max().item() for i in compared)
        results.data["equality"] = {
            "dtype": "float32", "steps": len(runs[1][1]), "max_abs_logit_error": max(errors),
            "max_abs_logit": scale, "max_relative_error": max(errors) / scale,
            "greedy_tokens_identical": runs[1][1] == runs[2][1],
            "tokens_compared": sum(len(t) for t in runs[1][1]),
            "first_differing_step": None if same == len(runs[1][1]) else same,
        }
        results.save()
        log(f"equality: {results.data['equality']}")
        # 2./3. speed, bf16
        bf16 = {**config, "dtype": "bfloat16"}
        modes = [("eager", 0)] if args.no_graphs or device == "cpu" else [("eager", 0), ("cuda_graphs", 64)]
        for mode, graphs in modes:
            for size in (1, 2):
                if time.monotonic() - started > args.time_budget:
                    results.data["runs"].append({"tp": size, "mode": mode, "skipped": "time budget"})
                    continue
                runner = make_runner(bf16, size, ranks, device, num_blocks, graphs)
                group = runner.tensor_parallel if size > 1 and mode == "eager" else None
                for batch, prompt_len, new_tokens in shapes:
                    result = generate(runner, batch, prompt_len, new_tokens, vocab, budget, group)
                    results.data["runs"].append({"tp": size, "mode": mode, "dtype": "bfloat16", **result})
                    results.save()
                    log(f"TP={size} {mode}: {result}")
                del runner
                release_memory()
    finally:
        ranks.close()
        results.data["wall_s"] = round(time.monotonic() - started, 1)
        results.save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
