"""Split-count sweep for paged decode attention where the default misses its goal.

bench_kernels.py found batch 16 x 4k context at 71% of copy bandwidth with the default
split rule (goal 80%). This times forced split counts and tile sizes on that shape and
two neighbours, each checked against SDPA first, with the same timer and data layout.

    python benchmarks/sweep_decode_splits.py --out benchmarks/results/decode_splits_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import BLOCK_SIZE, HEAD_DIM, KV_HEADS, Timer, copy_bandwidth, decode_combo  # noqa: E402

SHAPES = [(16, 4096), (16, 8192), (64, 4096)]
SPLITS = [2, 4, 8, 16]
TILES = [(64, 4), (128, 4)]  # (block_n, num_stages)


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
    sweep = [("default", None)] + [
        (f"s{s}n{n}st{st}", DecodeConfig(block_n=n, num_stages=st, num_splits=s)) for s in SPLITS for n, st in TILES
    ]
    rows = []
    for batch, context in SHAPES:
        row = {"batch": batch, "context": context, **decode_combo(torch, F, timer, k_cache, v_cache, batch, context,
                                                                   copy_bw, sweep)}
        rows.append(row)
        ok = {k: v for k, v in row["configs"].items() if "us" in v}
        best = min(ok, key=lambda k: ok[k]["us"])
        print(f"batch {batch:>3} ctx {context:>5}: sdpa {row['sdpa_us']:.1f} us | default "
              f"{ok['default']['us']:.1f} us {ok['default']['of_copy']:.1%} (splits {row['configs']['default']['num_splits']}) "
              f"| best {best} {ok[best]['us']:.1f} us {ok[best]['of_copy']:.1%}")
        for name in sorted(ok, key=lambda k: ok[k]["us"])[:6]:
            print(f"    {name:<14} {ok[name]['us']:8.1f} us {ok[name]['of_copy']:7.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"copy_GBps": copy_bw / 1e9, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
