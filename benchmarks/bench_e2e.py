"""End-to-end throughput and time to first token, against transformers in the same run.

Starts the stack on the demo model (or uses --address), sends N concurrent
greedy chat requests, and reports output tokens/s and TTFT (median over
--repeats runs). Then times transformers `generate` on the same prompts, float32:
one request at a time, and all in one left-padded batch. Prints the ratios.

    python benchmarks/bench_e2e.py --concurrency 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is photosynthesis?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Name the planets of the solar system.",
    "What does a compiler do?",
    "Suggest a name for a cat.",
    "How do airplanes fly?",
    "What is the boiling point of water?",
    "Describe a rainbow.",
    "Who wrote Romeo and Juliet?",
]


async def one_request(stub, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    request = scheduler_pb2.GenerateRequest(
        messages=[scheduler_pb2.ChatMessage(role="user", content=prompt)],
        sampling_params=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
    )
    start = time.perf_counter()
    ttft, tokens = None, 0
    async for reply in stub.Generate(request):
        if ttft is None and reply.token_ids:
            ttft = time.perf_counter() - start
        tokens += len(reply.token_ids)
    return ttft or 0.0, time.perf_counter() - start, tokens


async def run_ours(address: str, prompts: list[str], max_tokens: int) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(stub, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return {"tok_s": tokens / wall, "ttft_median": statistics.median(r[0] for r in results), "tokens": tokens}


def run_transformers(prompts: list[str], max_tokens: int, model_path: Path, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        start, tokens = time.perf_counter(), 0
        for text in texts:
            ids = tok(text, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
        sequential = tokens / (time.perf_counter() - start)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        batch = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
            new = out[:, batch["input_ids"].shape[1] :]
            # Count each row's tokens up to and including its first EOS, as a server would stream.
            useful = 0
            for row in new.tolist():
                useful += next(
                    (i + 1 for i, t in enumerate(row) if t == eos or (isinstance(eos, list) and t in eos)), len(row)
                )
            rates.append(useful / (time.perf_counter() - start))
    return {"sequential_tok_s": sequential, "batched_tok_s": statistics.median(rates)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="", help="a running scheduler; default: start one on the demo model")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]

    from llmexec.demo_model import demo_model_path

    model_path = demo_model_path()
    stack = None
    address = args.address
    if not address:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from stack_fixture import start_stack

        stack = start_stack(
            Path(tempfile.mkdtemp(prefix="llmexec-bench-")),
            str(model_path),
            "--max-num-seqs",
            str(max(args.concurrency, 1)),
        )
        address = stack.scheduler
    try:
        asyncio.run(run_ours(address, prompts[:2], 4))  # warm-up
        runs = [asyncio.run(run_ours(address, prompts, args.max_tokens)) for _ in range(args.repeats)]
    finally:
        if stack is not None:
            stack.down()
    ours = {
        "tok_s": statistics.median(r["tok_s"] for r in runs),
        "ttft_median": statistics.median(r["ttft_median"] for r in runs),
    }
    print(
        f"llmexec   {args.concurrency} concurrent, {args.max_tokens} new tokens max: "
        f"{ours['tok_s']:.1f} output tok/s (median of {args.repeats}), median TTFT {ours['ttft_median'] * 1000:.0f} ms"
    )
    if args.skip_transformers:
        return 0
    hf = run_transformers(prompts, args.max_tokens, model_path, args.repeats)
    print(
        f"transformers one at a time: {hf['sequential_tok_s']:.1f} tok/s;  batched (padded): "
        f"{hf['batched_tok_s']:.1f} tok/s (median of {args.repeats})"
    )
    print(
        f"ratio llmexec / transformers sequential: {ours['tok_s'] / hf['sequential_tok_s']:.2f}x;  "
        f"llmexec / transformers batched: {ours['tok_s'] / hf['batched_tok_s']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
