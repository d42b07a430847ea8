"""The scheduler's per-step CPU work at batch 256, against a real redis-server (issue 6).

Times, per decode step of 256 running sequences: save_step alone, and the whole
scheduler-side step (schedule + update + save_step + building and serializing the
ExecuteStepRequest). "before" is SequenceStore as of --old-ref (read with `git show`
into a temporary module), "after" is the working tree's; both run in this process
against the same redis-server (appendonly, as the stack runs it), on separate key
prefixes, with the same scheduler code. Prints medians (ms) as JSON.

    python benchmarks/bench_scheduler_step.py [--steps 60] [--batch 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from llmexec.redis_server import EmbeddedRedis
from llmexec.rpc.codec import step_to_pb
from llmexec.sampling_params import SamplingParams
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.scheduler import Scheduler
from llmexec.scheduler.sequence import Sequence
from llmexec.scheduler.state_store import SequenceStore

REPO = Path(__file__).resolve().parent.parent
# The commit before the one-command-per-sequence save_step.
DEFAULT_OLD_REF = "0463f630a75d14ca143c9c16e8ba0ff92628e9d1"


def old_store_class(ref: str, workdir: Path):
    source = subprocess.run(["git", "show", f"{ref}:services/scheduler/state_store.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = workdir / "state_store_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("state_store_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SequenceStore


def run(store, batch: int, steps: int, prompt_len: int, block_size: int) -> dict:
    blocks_per_seq = (prompt_len + steps + 2) // block_size + 1
    scheduler = Scheduler(BlockManager(batch * blocks_per_seq, block_size), max_model_len=prompt_len + steps + 8,
                          max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len, eos_token_ids={2})
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):
        scheduler.add(Sequence(f"s{i}", [(i * 7 + j) % 30000 + 3 for j in range(prompt_len)], sampling_params=params))
    step = scheduler.schedule()  # prefill, not timed
    store.save_step(scheduler.update(step, [5] * len(step.sequences)))
    save_ms, total_ms, message_bytes = [], [], []
    for n in range(steps):
        started = time.perf_counter()
        step = scheduler.schedule()
        request = step_to_pb(step.step_input).SerializeToString()
        touched = scheduler.update(step, [(n * 13 + i) % 30000 + 3 for i in range(len(step.sequences))])
        saving = time.perf_counter()
        store.save_step(touched)
        done = time.perf_counter()
        assert len(step.sequences) == batch
        save_ms.append((done - saving) * 1e3)
        total_ms.append((done - started) * 1e3)
        message_bytes.append(len(request))
    return {"save_step_ms": round(statistics.median(save_ms), 3),
            "scheduler_step_ms": round(statistics.median(total_ms), 3),
            "step_request_bytes": int(statistics.median(message_bytes))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--old-ref", default=DEFAULT_OLD_REF, help="git ref whose SequenceStore is 'before'")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_cls = old_store_class(args.old_ref, Path(tmp))
        server = EmbeddedRedis(data_dir=Path(tmp) / "redis", appendonly=True).start()
        try:
            client = redis.Redis.from_url(server.url)
            results = {}
            for name, cls in (("before", old_cls), ("after", SequenceStore)):
                results[name] = run(cls(client, prefix=f"bench-{name}"), args.batch, args.steps, args.prompt_len,
                                    args.block_size)
        finally:
            server.stop()
    results["config"] = {**vars(args), "python": sys.version.split()[0]}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
