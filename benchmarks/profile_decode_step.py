"""Where a decode step's GPU time goes: every kernel of one step, timed by torch.profiler.

Dummy Llama-3-8B weights made on the GPU by the loader (as bench_serving_gpu.py), one runner
in this process attached over CUDA IPC, eager decode steps (the CUDA graph replays the same
kernels) at each batch size. Prints, per batch, the kernels grouped by name with their
total time per step and count, and the sum against the weights' read floor; JSON to --out.

    python benchmarks/profile_decode_step.py --out benchmarks/results/decode_step_kernels_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving_gpu import LLAMA3_8B
from local_services import LocalServices

COPY_BYTES_PER_S = 4.28e12


def kernel_table(batch: int, context: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmexec.sampling_params import SamplingParams
    from llmexec.step import SequenceInput, StepInput

    runner = RUNNER
    per_seq = -(-(context + 1) // runner.block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    bs = runner.block_size
    step = StepInput([11] * batch, [context] * batch, [t[context // bs] * bs + context % bs for t in tables],
                     [SequenceInput(1, context + 1, t, True, SamplingParams(temperature=0)) for t in tables])
    for _ in range(3):
        runner.execute(step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.execute(step)
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type.name == "CUDA" and event.device_time_total > 0:
            entry = by_name[event.name[:90]]
            entry[0] += event.device_time_total / steps
            entry[1] += 1 / steps
    rows = sorted(({"kernel": k, "us_per_step": v[0], "count_per_step": v[1]} for k, v in by_name.items()),
                  key=lambda r: -r["us_per_step"])
    return {"batch": batch, "context": context, "kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "kernels_per_step": sum(r["count_per_step"] for r in rows), "kernels": rows}


RUNNER = None


def main() -> int:
    global RUNNER
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/decode_step_kernels_h200.json")
    p.add_argument("--batch", type=int, action="append", default=[])
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    import torch

    from llmexec.rpc.client import sync_channel
    from llmexec.runner.cuda_ipc_attach import attach_cuda_weights
    from llmexec.runner.model_runner import GpuOptions, ModelRunner
    from llmexec.runner.server import layout_from_pb
    from llmexec.v1 import loader_pb2, loader_pb2_grpc

    work = Path(tempfile.mkdtemp(prefix="llmexec-kernels-"))
    (work / "config.json").write_text(json.dumps(LLAMA3_8B))
    batches = args.batch or [1, 256]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    with LocalServices(work) as services:
        loader = services.loader(str(work / "config.json"), "--load-format", "dummy", "--device", "cuda")
        with sync_channel(loader) as channel:
            pb = loader_pb2_grpc.LoaderServiceStub(channel).GetWeightLayout(loader_pb2.GetWeightLayoutRequest(),
                                                                            timeout=60)
        weights = attach_cuda_weights(layout_from_pb(pb))
        weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        per_seq = -(-(args.context + 1) // 16)
        RUNNER = ModelRunner(json.loads(pb.model_info.config_json), weights, max(batches) * per_seq + 1, 16, "cuda",
                             gpu=GpuOptions(cuda_graph_max_batch=0))
        result["weight_bytes"] = weight_bytes
        result["weight_read_floor_us"] = weight_bytes / COPY_BYTES_PER_S * 1e6
        for batch in batches:
            row = kernel_table(batch, args.context, args.steps)
            result["rows"].append(row)
            print(f"\nbatch {batch}, context {args.context}: {row['kernel_us_per_step']:.0f} us of kernels in "
                  f"{row['kernels_per_step']:.0f} launches per step (weights alone: "
                  f"{result['weight_read_floor_us']:.0f} us at 4.28 TB/s)")
            for r in row["kernels"][:25]:
                print(f"  {r['us_per_step']:8.1f} us  x{r['count_per_step']:5.0f}  {r['kernel']}")
        RUNNER = None
    out = Path(os.environ["OUT"]) / Path(args.out).name if os.environ.get("OUT") else Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
