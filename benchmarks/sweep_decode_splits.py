"""Split-count / tile sweep for paged decode attention over the shapes the 80% goal covers.

bench_kernels.py found batch 16 x 4k context at 71% of copy bandwidth with the default
split rule (goal 80%). This times, on batch 16/64/256 x 4k/32k (and 16 x 8k), the default
config, the same config with the two-launch merge, and forced split counts x tile shapes,
each checked against SDPA first, with the same timer and data layout as bench_kernels.py.
The default tile and the one-wave split rule (triton_decode.choose_num_splits) were read off this grid.

    python benchmarks/sweep_decode_splits.py --out benchmarks/results/decode_splits_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import BLOCK_SIZE, HEAD_DIM, KV_HEADS, Timer, copy_bandwidth, decode_combo

# (batch, context) -> forced split counts to try
SHAPES = {
    (16, 4096): [2, 3, 4, 6, 8],
    (16, 8192): [2, 3, 4, 6, 8],
    (16, 32768): [2, 3, 4, 6, 8, 12, 16],
    (64, 4096): [1, 2, 3, 4],
    (64, 32768): [1, 2, 3, 4],
    (256, 4096): [1, 2],
    (256, 32768): [1, 2],
}
TILES = [(64, 4, 5), (64, 4, 4), (128, 4, 4), (128, 8, 4), (32, 4, 5)]  # (block_n, num_warps, num_stages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/decode_splits_h200.json")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    from llmexec.kernels.triton_decode import DecodeConfig

    device = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(torch, device)
    copy_bw = copy_bandwidth(torch, timer, device, False)
    blocks = max(b * -(-c // BLOCK_SIZE) for b, c in SHAPES) + 1
    shape = (blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    rows, began = [], time.perf_counter()
    for (batch, context), splits in SHAPES.items():
        sweep = [("default", None), ("unfused", DecodeConfig(fused_merge=False))] + [
            (f"s{s}n{n}w{w}st{st}", DecodeConfig(block_n=n, num_warps=w, num_stages=st, num_splits=s))
            for s in splits
            for n, w, st in TILES
        ]
        row = {
            "batch": batch,
            "context": context,
            **decode_combo(torch, F, timer, k_cache, v_cache, batch, context, copy_bw, sweep),
        }
        rows.append(row)
        torch.cuda.empty_cache()
        ok = {k: v for k, v in row["configs"].items() if "us" in v}
        bad = {k: v.get("error") for k, v in row["configs"].items() if "us" not in v}
        print(
            f"batch {batch:>3} ctx {context:>5} ({time.perf_counter() - began:.0f} s): sdpa {row['sdpa_us']:.1f} us"
            f" | default {ok['default']['us']:.1f} us {ok['default']['of_copy']:.1%} "
            f"(splits {row['configs']['default']['num_splits']}) | unfused {ok['unfused']['us']:.1f} us "
            f"{ok['unfused']['of_copy']:.1%} | failed {bad}"
        )
        for name in sorted(ok, key=lambda k: ok[k]["us"])[:8]:
            print(f"    {name:<16} {ok[name]['us']:8.1f} us {ok[name]['of_copy']:7.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"copy_GBps": copy_bw / 1e9, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
