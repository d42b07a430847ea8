"""Rank 0 of a tensor-parallel runner: the ModelRunner the RunnerService holds.

It is a ModelRunner over rank 0's shard whose every step goes first to the other
ranks (llmexec.runner.tp_worker), so that all ranks run the forward pass together;
the logits come back whole (the head's slices gathered), and rank 0 samples as
any runner does. The scheduler sees one runner.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Mapping

import torch

from llmexec.errors import UnavailableError
from llmexec.models.tensor_parallel import rank_config
from llmexec.runner.model_runner import GpuOptions, ModelRunner, num_blocks_for_memory
from llmexec.runner.sampled_tokens import CarriedTokens
from llmexec.runner.tp_worker import RankSetup, WorkerRanks, rank_device
from llmexec.runner.weight_attach import attach_weights
from llmexec.step import StepInput
from llmexec.weight_layout import WeightLayout

log = logging.getLogger(__name__)


class TensorParallelModelRunner(ModelRunner):
    """A ModelRunner for rank 0 whose steps run on every rank.

    Build it with `create`. A failure after a step was handed to the other ranks
    leaves the ranks out of step: the runner refuses further steps (UNAVAILABLE) and
    calls `on_failure` (the service exits, to be restarted with a fresh group).
    """

    ranks: WorkerRanks
    on_failure: Callable[[], None] | None = None
    broken: str = ""

    @classmethod
    def create(
        cls,
        ranks: WorkerRanks,
        config: Mapping,
        layouts: list[WeightLayout],
        num_blocks: int,
        block_size: int,
        device: str = "cpu",
        gpu: GpuOptions | None = None,
        owns_ranks: bool = False,
        rank0_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> TensorParallelModelRunner:
        """Every rank attaches to its shard (layouts[r]) and builds its part, rank 0 here.

        owns_ranks: close the workers when this runner is closed or collected.
        rank0_weights: rank 0's shard given directly instead of layouts[0] (benchmarks).
        """
        setup = RankSetup(dict(config), list(layouts), num_blocks, block_size, device, gpu=gpu)
        ranks.attach(setup)
        runner = cls.__new__(cls)
        runner.ranks = ranks
        try:
            weights = attach_weights(layouts[0]) if rank0_weights is None else rank0_weights
            ModelRunner.__init__(runner, config, weights, num_blocks, block_size, rank_device(device, 0),
                                 tensor_parallel=ranks.group, gpu=gpu)
        finally:
            ranks.wait_attached()  # the workers report, whatever happened here
        if owns_ranks:
            runner._finalizer = weakref.finalize(runner, ranks.close)
        return runner

    @property
    def tensor_parallel_size(self) -> int:
        return self.ranks.group.size

    def execute_logits(self, step: StepInput, carried: CarriedTokens | None = None) -> torch.Tensor:
        if carried is not None:  # every rank gets the step from the host
            carried.write_into(step.input_ids)
        if self.broken:
            raise UnavailableError(f"this runner lost a tensor-parallel rank ({self.broken}); it must restart")
        self.validate(step)  # refused here, before any rank starts it
        try:
            self.ranks.run_step(step)
            return super().execute_logits(step)
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.error("tensor-parallel step failed; the ranks are out of step: %s", self.broken)
            if self.on_failure is not None:
                self.on_failure()
            raise UnavailableError(f"a tensor-parallel rank failed ({self.broken}); the runner must restart") from exc

    def close(self) -> None:
        """Stop the worker ranks when this runner owns them."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()


def start_tensor_parallel_runner(
    config: Mapping,
    layouts: list[WeightLayout],
    num_blocks: int,
    block_size: int,
    kv_cache_bytes: int,
    device: str = "cpu",
    gpu: GpuOptions | None = None,
    threads: int = 0,
) -> TensorParallelModelRunner:
    """The RunnerService's path: start ranks 1..N-1 (N = len(layouts)) and build rank 0.

    num_blocks 0: on the CPU sized from kv_cache_bytes per rank (each rank holds its own
    KV heads); on CUDA from each GPU's free memory. threads 0 on the CPU: the cores split
    evenly between the ranks. A rank that fails later ends this process (os._exit), so
    whatever supervises it starts a fresh group.
    """
    size = len(layouts)
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and not threads:
        threads = max(1, (os.cpu_count() or 1) // size)
    if on_cpu:
        torch.set_num_threads(threads)
    if not num_blocks and on_cpu:
        num_blocks = num_blocks_for_memory(rank_config(config, size), block_size, kv_cache_bytes, torch.float32)
    ranks = WorkerRanks.start(size, device, threads if on_cpu else 0)
    try:
        runner = TensorParallelModelRunner.create(ranks, config, layouts, num_blocks, block_size, device, gpu,
                                                  owns_ranks=True)
    except BaseException:
        ranks.close()
        raise
    runner.on_failure = _exit_process
    return runner


def _exit_process() -> None:
    logging.shutdown()
    os._exit(1)


async def attach_tensor_parallel(cfg, info, rank0_layout: WeightLayout) -> TensorParallelModelRunner:
    """The RunnerService's attachment to a model the loader split over ranks (ModelInfo.tensor_parallel_size):
    fetch ranks 1..N-1's layouts, start their processes, build rank 0. `cfg` is the runner's RunnerConfig."""
    import asyncio
    import json

    from llmexec.rpc.client import aio_channel
    from llmexec.runner.server import layout_from_pb  # the server imports this module
    from llmexec.v1 import loader_pb2, loader_pb2_grpc

    layouts = [rank0_layout]
    async with aio_channel(cfg.loader_address, cfg.loader_tls) as channel:
        stub = loader_pb2_grpc.LoaderServiceStub(channel)
        for rank in range(1, info.tensor_parallel_size):
            reply = await stub.GetWeightLayout(
                loader_pb2.GetWeightLayoutRequest(model_id=info.model_id, tensor_parallel_rank=rank), timeout=60
            )
            if reply.model_info.generation != info.generation:
                raise UnavailableError(f"the loader reloaded {info.model_id} while this runner attached; retry")
            layouts.append(layout_from_pb(reply))
    device = "cpu" if cfg.device == "auto" else cfg.device
    runner = await asyncio.to_thread(
        start_tensor_parallel_runner, json.loads(info.config_json), layouts, cfg.num_blocks, cfg.block_size,
        cfg.kv_cache_bytes, device, cfg.gpu,
    )
    log.info("attached to %s (%s) split over %d ranks on %s; KV cache %d blocks x %d tokens per rank",
             info.model_id, info.architecture, len(layouts), device, runner.num_blocks, cfg.block_size)
    return runner
