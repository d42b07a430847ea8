"""RunnerService: attach to the loader's weights, hold the KV cache, run steps."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

import torch

from llmexec.errors import FailedPreconditionError, UnavailableError
from llmexec.rpc.client import aio_channel
from llmexec.rpc.codec import step_from_pb, step_output_to_pb
from llmexec.rpc.tls import ClientTLS
from llmexec.runner.model_runner import ModelRunner, num_blocks_for_memory
from llmexec.runner.tracer import StageTrace, trace_prefill_and_decode
from llmexec.runner.token_history import TokenHistories
from llmexec.runner.weight_attach import attach_weights
from llmexec.v1 import loader_pb2, loader_pb2_grpc, runner_pb2, runner_pb2_grpc
from llmexec.weight_layout import TensorLocation, WeightLayout, WeightSegment

log = logging.getLogger(__name__)


@dataclass
class RunnerConfig:
    loader_address: str
    model_id: str = ""
    block_size: int = 16
    num_blocks: int = 0  # 0: size the cache from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    device: str = "cpu"
    loader_tls: ClientTLS | None = None  # None: plaintext to the loader


def layout_from_pb(pb: loader_pb2.GetWeightLayoutResponse) -> WeightLayout:
    return WeightLayout(
        segments=[WeightSegment(path=s.path, size_bytes=s.size_bytes) for s in pb.segments],
        tensors=[
            TensorLocation(
                name=t.name,
                dtype=t.dtype,
                shape=tuple(t.shape),
                segment_index=t.segment_index,
                offset_bytes=t.offset_bytes,
            )
            for t in pb.tensors
        ],
    )


async def attach_to_loader(cfg: RunnerConfig) -> tuple[loader_pb2.ModelInfo, ModelRunner]:
    """Fetch the weight layout from the loader, map it, and build the model runner."""
    async with aio_channel(cfg.loader_address, cfg.loader_tls) as channel:
        layout_pb = await loader_pb2_grpc.LoaderServiceStub(channel).GetWeightLayout(
            loader_pb2.GetWeightLayoutRequest(model_id=cfg.model_id), timeout=60
        )
    info = layout_pb.model_info
    weights = attach_weights(layout_from_pb(layout_pb))
    config = json.loads(info.config_json)
    num_blocks = cfg.num_blocks or num_blocks_for_memory(config, cfg.block_size, cfg.kv_cache_bytes, torch.float32)
    runner = await asyncio.to_thread(ModelRunner, config, weights, num_blocks, cfg.block_size, cfg.device)
    log.info("attached to %s (%s); KV cache %d blocks x %d tokens", info.model_id, info.architecture,
             num_blocks, cfg.block_size)
    return info, runner


class RunnerServicer(runner_pb2_grpc.RunnerServiceServicer):
    """Serves from the moment the port is bound; answers UNAVAILABLE until attach()."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.model_info: loader_pb2.ModelInfo | None = None
        self.runner: ModelRunner | None = None
        # One step at a time: the KV cache and torch's threads are shared.
        self._step_lock = asyncio.Lock()
        # A new id per process: a scheduler that planned steps for the KV cache of
        # an earlier runner on this address learns that the cache is gone.
        self.instance_id = uuid.uuid4().hex
        self.token_histories = TokenHistories()

    def attach(self, model_info: loader_pb2.ModelInfo, runner: ModelRunner) -> None:
        self.model_info, self.runner = model_info, runner

    def _attached(self) -> ModelRunner:
        if self.runner is None:
            raise UnavailableError("the runner is still attaching to the loader's weights; retry shortly")
        return self.runner

    async def GetRunnerInfo(self, request, context):
        runner = self._attached()
        params = dict(runner.model.named_parameters())
        return runner_pb2.GetRunnerInfoResponse(
            model_info=self.model_info,
            num_blocks=runner.num_blocks,
            block_size=runner.block_size,
            device=self.device,
            kv_cache_dtype=str(runner.kv_cache_dtype).removeprefix("torch."),
            weight_addresses=[
                runner_pb2.WeightAddress(
                    name=name, data_ptr=p.data_ptr(), size_bytes=p.numel() * p.element_size()
                )
                for name, p in params.items()
            ],
            pid=os.getpid(),
            instance_id=self.instance_id,
        )

    async def ExecuteStep(self, request, context):
        runner = self._attached()
        step = step_from_pb(request)
        if step.runner_instance_id and step.runner_instance_id != self.instance_id:
            raise FailedPreconditionError(
                f"this step was planned for runner instance {step.runner_instance_id}, this is {self.instance_id} "
                "(the runner restarted and its KV cache is empty): recompute"
            )
        async with self._step_lock:
            started = time.perf_counter()
            output = await asyncio.to_thread(self._execute, runner, step)
            elapsed = time.perf_counter() - started
        return step_output_to_pb(output, elapsed)

    def _execute(self, runner: ModelRunner, step):
        runner.validate(step)  # before the histories change
        return runner.execute_step(step, self.token_histories.update(step))

    async def TraceStep(self, request, context):
        runner = self._attached()
        async with self._step_lock:
            stages = await asyncio.to_thread(trace_prefill_and_decode, runner, list(request.prompt_token_ids))
        return runner_pb2.TraceStepResponse(
            stages=[trace_stage_to_pb(stage) for stage in stages], architecture=self.model_info.architecture
        )


def trace_stage_to_pb(stage: StageTrace) -> runner_pb2.TraceStage:
    def tensors(descs):
        return [runner_pb2.TensorInfo(shape=d.shape, dtype=d.dtype) for d in descs]

    return runner_pb2.TraceStage(
        stage=stage.stage,
        num_tokens=stage.num_tokens,
        sampled_token_id=stage.sampled_token_id,
        calls=[
            runner_pb2.ModuleCall(
                index=c.index, name=c.name, class_name=c.class_name, depth=c.depth, inputs=tensors(c.inputs),
                outputs=tensors(c.outputs), seconds=c.seconds, self_seconds=c.self_seconds,
            )
            for c in stage.calls
        ],
    )
