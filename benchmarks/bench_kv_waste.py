"""KV-cache waste under a mixed workload: the share of allocated KV slots that hold no token.

After the PagedAttention paper (vLLM: under 4% of KV memory wasted; systems
that reserve a contiguous region per request: 60-80%). A mix of requests
(prompts of 16-1024 tokens, 16-384 new tokens, arriving over time) runs
through the stack; after every step the scheduler adds the slots of the
blocks it holds, and the empty ones among them (the unfilled tail of each
sequence's last block), to llmexec:kv_slots_allocated_total and
llmexec:kv_slots_empty_total. Waste = empty / allocated, averaged over steps.

Baselines for the same requests, in the same run: a system that reserves, for
each running request, a contiguous region of max_model_len slots (Orca "Max")
or exactly prompt + output tokens (Orca "Oracle", which knows each output
length in advance). Their waste is computed per decode step: a request with
p prompt and o output tokens holds on average p + (o + 1) / 2 tokens in its
region over its o steps.

    python benchmarks/bench_kv_waste.py [--block-size 16] [--requests 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from local_services import LocalServices, save_random_llama

from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc


async def one(stub, delay: float, prompt: list[int], max_tokens: int) -> tuple[int, int]:
    await asyncio.sleep(delay)
    request = scheduler_pb2.GenerateRequest(prompt_token_ids=prompt, sampling_params=sampling_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))
    tokens = 0
    async for reply in stub.Generate(request, timeout=3600):
        tokens += len(reply.token_ids)
    return len(prompt), tokens


async def run(address: str, workload: list[tuple[float, list[int], int]]) -> tuple[list[tuple[int, int]], dict]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        done = await asyncio.gather(*(one(stub, *w) for w in workload))
        info = await stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest())
    text = urllib.request.urlopen(f"http://127.0.0.1:{info.metrics_port}/metrics").read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name.split("{")[0]] = samples.get(name.split("{")[0], 0.0) + float(value)
    return done, {**samples, "max_model_len": info.max_model_len}


def reservation_waste(done: list[tuple[int, int]], reserve) -> float:
    held = sum(o * (p + (o + 1) / 2) for p, o in done)
    reserved = sum(o * reserve(p, o) for p, o in done)
    return 1 - held / reserved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--arrival-rate", type=float, default=8.0, help="requests per second (Poisson)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="llmexec-bench-waste-"))
    model = args.model or str(save_random_llama(folder / "model"))
    rng = random.Random(1)
    workload, t = [], 0.0
    for _ in range(args.requests):
        t += rng.expovariate(args.arrival_rate)
        prompt = [rng.randrange(1000) for _ in range(rng.randint(16, 1024))]
        workload.append((t, prompt, rng.randint(16, 384)))
    with LocalServices(folder) as services:
        loader = services.loader(model)
        runner = services.runner(loader, block_size=args.block_size, num_blocks=65536 // args.block_size * 2)
        scheduler = services.scheduler([runner], loader, "--max-num-seqs", "64", "--max-model-len", "2048")
        started = time.perf_counter()
        done, metrics = asyncio.run(run(scheduler, workload))
        wall = time.perf_counter() - started
    allocated = metrics["llmexec:kv_slots_allocated_total"]
    empty = metrics["llmexec:kv_slots_empty_total"]
    max_len = metrics["max_model_len"]
    results = {
        "paged_waste_share": empty / allocated,
        "baseline_reserve_max_model_len_waste_share": reservation_waste(done, lambda p, o: max_len),
        "baseline_reserve_exact_length_waste_share": reservation_waste(done, lambda p, o: p + o),
        "block_size": args.block_size,
        "requests": args.requests,
        "prompt_tokens": sum(p for p, _ in done),
        "output_tokens": sum(o for _, o in done),
        "max_model_len": max_len,
        "preemptions": metrics.get("vllm:num_preemptions_total", 0.0),
        "wall_s": wall,
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
