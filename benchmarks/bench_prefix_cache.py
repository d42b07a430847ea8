"""Prefix caching on a prefix-heavy workload: a shared 1,000-token system prompt, 64 requests.

Each request is the same 1,000-token system prompt plus a question of its own
(24 tokens), greedy, --max-tokens new tokens. All 64 are sent at once to a
scheduler with prefix caching, then to one without (--no-prefix-caching), in
the same run, on the same runner and model (a fresh scheduler each time, so
neither starts with a warm cache). Reports time to first token (median, p90),
output tokens/s, wall time and the prefix-cache hit rate from /metrics.

    python benchmarks/bench_prefix_cache.py              # random Llama (hidden 256, 4 layers)
    python benchmarks/bench_prefix_cache.py --model PATH # any checkpoint llmexec loads
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from local_services import LocalServices, save_random_llama

from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc


async def one(stub, prompt: list[int], max_tokens: int) -> tuple[float, int, int]:
    request = scheduler_pb2.GenerateRequest(prompt_token_ids=prompt, sampling_params=sampling_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    ttft, tokens, cached = None, 0, 0
    async for reply in stub.Generate(request, timeout=3600):
        if ttft is None and reply.token_ids:
            ttft = time.perf_counter() - start
        tokens += len(reply.token_ids)
        cached = reply.cached_prompt_tokens or cached
    return ttft, tokens, cached


async def run(address: str, prompts: list[list[int]], max_tokens: int) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(stub, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - start
        info = await stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest())
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{info.metrics_port}/metrics").read().decode()
    hits = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total"))
    queries = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("vllm:prefix_cache_queries_total"))
    return {
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
        "output_tok_s": tokens / wall,
        "wall_s": wall,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "cached_prompt_tokens_per_request": statistics.mean(r[2] for r in results),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="default: a random Llama saved to a temporary folder")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--question-tokens", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-blocks", type=int, default=6144)
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="llmexec-bench-prefix-"))
    model = args.model or str(save_random_llama(folder / "model"))
    rng = random.Random(0)
    vocab = 4096 if not args.model else 1000
    system = [rng.randrange(vocab) for _ in range(args.system_tokens)]
    prompts = [system + [rng.randrange(vocab) for _ in range(args.question_tokens)] for _ in range(args.requests)]
    results = {}
    with LocalServices(folder) as services:
        loader = services.loader(model)
        runner = services.runner(loader, num_blocks=args.num_blocks)
        for label, extra in (("prefix_caching", ()), ("no_prefix_caching", ("--no-prefix-caching",))):
            scheduler = services.scheduler([runner], loader, "--max-num-seqs", str(args.requests), *extra,
                                           name=f"scheduler-{label}")
            asyncio.run(run(scheduler, prompts[:1], 2))  # warm-up (a prompt the cache then holds, as a server would)
            results[label] = asyncio.run(run(scheduler, prompts, args.max_tokens))
            services.stop(f"scheduler-{label}")
    on, off = results["prefix_caching"], results["no_prefix_caching"]
    results["speedup"] = {"ttft_median": off["ttft_median_s"] / on["ttft_median_s"],
                          "output_tok_s": on["output_tok_s"] / off["output_tok_s"]}
    results["workload"] = {"requests": args.requests, "system_tokens": args.system_tokens,
                           "question_tokens": args.question_tokens, "max_tokens": args.max_tokens,
                           "model": args.model or "random Llama, hidden 256, 4 layers, vocab 4096"}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
