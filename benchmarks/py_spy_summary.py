"""Summarize a py-spy raw profile (`py-spy record -f raw`): the share of samples each frame
appears in (inclusive) and is on top of (own), most first.

    python benchmarks/py_spy_summary.py scheduler.txt [--top 40]
"""

from __future__ import annotations

import argparse
from collections import Counter


def summarize(path: str, top: int) -> str:
    inclusive, own, total = Counter(), Counter(), 0
    with open(path) as f:
        for line in f:
            stack, count = line.rsplit(" ", 1)
            frames, n = stack.split(";"), int(count)
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    lines = [f"{path}: {total} samples", "-- inclusive"]
    lines += [f"{100 * n / total:5.1f}% {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["-- own"] + [f"{100 * n / total:5.1f}% {frame}" for frame, n in own.most_common(top // 2)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    print(summarize(args.profile, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
