"""The ranks of a tensor-parallel runner: one process each, one torch.distributed group.

Rank 0 is the runner process that serves RunnerService; it starts ranks 1..N-1 as
`python -m llmexec.runner.tp_worker` processes and joins them in one process group
(NCCL on GPUs, gloo on CPU). The other ranks never speak gRPC: rank 0 hands them
what to attach to and then every step through a gloo control group
(broadcast_object_list), and each runs the same forward pass on its shard, meeting
the others in the layers' all-reduces. Rank 0 alone samples and replies.

A worker exits when told to, or when rank 0 goes away (gloo sees the connection drop).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.models.parallel_layers import TensorParallelGroup
from llmexec.weight_layout import WeightLayout

log = logging.getLogger(__name__)

# Collectives on the device group meet within a step, so a rank that stops answering is a fault...
_STEP_TIMEOUT = datetime.timedelta(minutes=10)
# ...but the control group's broadcast waits for the next step, which may come hours later.
_IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class RankSetup:
    """What every rank needs to build its part of the runner (sent by rank 0)."""

    config: dict  # the model's HF config (whole; each rank derives its own shapes)
    layouts: list[WeightLayout]  # each rank's shard in shared memory, rank r at index r
    num_blocks: int  # 0 on CUDA: each rank sizes its cache, and the smallest count wins
    block_size: int
    device: str  # "cpu" or "cuda": rank r runs on cuda:r
    kv_cache_dtype: torch.dtype | None = None
    gpu: object | None = None  # llmexec.runner.model_runner.GpuOptions


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: the CPU, or GPU r."""
    return "cpu" if torch.device(device).type == "cpu" else f"cuda:{rank}"


def check_devices(size: int, device: str) -> None:
    """Refuse more ranks than the machine has devices (GPUs; CPU cores on the CPU)."""
    if torch.device(device).type == "cuda":
        available = torch.cuda.device_count()
        what = "GPUs"
    else:
        available = os.cpu_count() or 1
        what = "CPU cores"
    if size > available:
        raise InvalidArgumentError(
            f"tensor parallel size {size} needs one {what[:-1]} per rank, and this machine has {available} {what}"
        )


def init_group(rank: int, size: int, init_method: str, device: str) -> TensorParallelGroup:
    """Join the process group (every rank calls this); CUDA ranks bind GPU `rank` first."""
    backend = "gloo"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=_STEP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    return TensorParallelGroup(rank, size, device_group=dist.group.WORLD, control_group=control)


@dataclass
class WorkerRanks:
    """Rank 0's handle on ranks 1..N-1: starts them, tells them what to attach, hands them each step."""

    group: TensorParallelGroup
    processes: list[subprocess.Popen] = field(default_factory=list)
    closed: bool = False

    @classmethod
    def start(cls, size: int, device: str = "cpu", threads: int = 0, timeout: float = 120.0,
              worker_command: list[str] | None = None) -> WorkerRanks:
        """Start size - 1 worker processes and form the group with this process as rank 0.

        threads: torch threads of each worker (0: torch's default). worker_command: what
        runs a worker (default `python -m llmexec.runner.tp_worker`; a benchmark passes its
        own, which calls main() with another build_runner). Raises InvalidArgumentError for
        more ranks than devices, FailedPreconditionError when this process already belongs
        to a group, RuntimeError when a worker does not join.
        """
        check_devices(size, device)
        if dist.is_initialized():
            raise FailedPreconditionError("this process already runs a tensor-parallel group; close it first")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        level = logging.getLevelName(log.getEffectiveLevel())
        argv = [*(worker_command or [sys.executable, "-m", "llmexec.runner.tp_worker"]), "--size", str(size),
                "--init-method", init_method, "--device", device, "--threads", str(threads), "--log-level", level]
        processes = [subprocess.Popen([*argv, "--rank", str(rank)], stdin=subprocess.DEVNULL) for rank in range(1, size)]
        try:
            group = _init_rank0(size, init_method, device, processes, timeout)
        except BaseException:
            _stop_processes(processes, grace=0)
            raise
        log.info("tensor-parallel group of %d ranks on %s (workers: pids %s)", size, device,
                 [p.pid for p in processes])
        return cls(group, processes)

    def attach(self, setup: RankSetup) -> None:
        """Send every rank its setup; it builds its runner meanwhile (see wait_attached)."""
        self._send(("attach", setup))

    def wait_attached(self) -> None:
        """Wait until every rank has built its runner; raise RuntimeError with the first failure."""
        statuses = [None] * self.group.size
        dist.gather_object(None, statuses, dst=0, group=self.group.control_group)
        failures = [f"rank {rank}: {status}" for rank, status in enumerate(statuses) if status]
        if failures:
            raise RuntimeError("tensor-parallel ranks failed to attach: " + "; ".join(failures))

    def run_step(self, step) -> None:
        """Hand `step` (a StepInput) to every other rank, which runs it at once."""
        self._send(("step", step))

    def close(self) -> None:
        """Tell the workers to exit, wait for them (killing stragglers), leave the group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self._send(("stop", None))
        except Exception as exc:  # noqa: BLE001 - a worker already gone: nothing left to tell
            log.warning("could not tell the tensor-parallel workers to stop: %s", exc)
        _stop_processes(self.processes, grace=10.0)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _send(self, message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group.control_group)


def _init_rank0(size: int, init_method: str, device: str, processes, timeout: float) -> TensorParallelGroup:
    # init_process_group waits for every rank; a worker that died before joining would only
    # show as a timeout, so check on them meanwhile and fail with their exit code.
    result: dict = {}

    def join() -> None:
        try:
            result["group"] = init_group(0, size, init_method, device)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    joiner = threading.Thread(target=join, daemon=True)
    joiner.start()
    deadline = time.monotonic() + timeout
    while joiner.is_alive():
        joiner.join(0.2)
        dead = [(p.pid, p.returncode) for p in processes if p.poll() is not None]
        if dead and joiner.is_alive():
            raise RuntimeError(f"tensor-parallel worker(s) exited before joining the group (pid, code): {dead}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel workers did not join within {timeout:.0f}s")
    if "error" in result:
        raise result["error"]
    return result["group"]


def _stop_processes(processes: list[subprocess.Popen], grace: float) -> None:
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_runner_from_layouts(setup: RankSetup, group: TensorParallelGroup):
    """A worker's ModelRunner over its shard in the loader's shared memory."""
    from llmexec.runner.model_runner import ModelRunner
    from llmexec.runner.weight_attach import attach_weights

    return ModelRunner(
        setup.config, attach_weights(setup.layouts[group.rank]), setup.num_blocks, setup.block_size,
        rank_device(setup.device, group.rank), setup.kv_cache_dtype, tensor_parallel=group, gpu=setup.gpu,
    )


def serve_rank(group: TensorParallelGroup, build_runner=build_runner_from_layouts) -> None:
    """A worker's life: attach when told (build_runner(setup, group) -> ModelRunner), run each
    step rank 0 hands over, until told to stop."""
    runner = None
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=group.control_group)
        kind, payload = message[0]
        if kind == "stop":
            return
        if kind == "step":
            runner.execute_logits(payload)
            continue
        runner = None
        gc.collect()
        status = None
        try:
            runner = build_runner(payload, group)
        except Exception as exc:
            log.exception("rank %d failed to attach", group.rank)
            status = f"{type(exc).__name__}: {exc}"
        dist.gather_object(status, None, dst=0, group=group.control_group)


def main(argv: list[str] | None = None, build_runner=build_runner_from_layouts) -> None:
    p = argparse.ArgumentParser(prog="python -m llmexec.runner.tp_worker", description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--init-method", required=True, help="torch.distributed init method of rank 0's group")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s rank{args.rank} %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    group = init_group(args.rank, args.size, args.init_method, args.device)
    try:
        serve_rank(group, build_runner)
    except Exception:
        log.exception("tensor-parallel rank %d stops", args.rank)
        sys.exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
