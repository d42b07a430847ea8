"""RunnerService: attach to the loader's weights, hold the KV cache, run steps."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from llmexec.errors import FailedPreconditionError, UnavailableError
from llmexec.rpc.client import aio_channel
from llmexec.rpc.codec import step_from_pb, step_output_to_pb
from llmexec.rpc.tls import ClientTLS
from llmexec.runner.block_tables import BlockTables
from llmexec.runner.cuda_ipc_attach import attach_cuda_weights
from llmexec.runner.model_runner import GpuOptions, LaunchedStep, ModelRunner, num_blocks_for_memory
from llmexec.runner.sampled_tokens import SampledTokens
from llmexec.runner.token_history import TokenHistories
from llmexec.runner.tp_runner import attach_tensor_parallel
from llmexec.runner.tracer import StageTrace, trace_prefill_and_decode
from llmexec.runner.weight_attach import attach_weights
from llmexec.v1 import loader_pb2, loader_pb2_grpc, runner_pb2, runner_pb2_grpc
from llmexec.weight_layout import CudaIpcHandle, TensorLocation, WeightLayout, WeightSegment

log = logging.getLogger(__name__)

# How long a step waits for the step it continues to arrive (they come on separate calls).
CONTINUED_STEP_WAIT_S = 10.0


@dataclass
class RunnerConfig:
    loader_address: str
    model_id: str = ""
    block_size: int = 16
    num_blocks: int = 0  # 0: size the cache from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    # "auto": where the loader holds the weights (a GPU: attach over CUDA IPC), else the CPU.
    # "cuda" with weights in shared memory copies them to the GPU.
    device: str = "auto"
    loader_tls: ClientTLS | None = None  # None: plaintext to the loader
    gpu: GpuOptions = field(default_factory=GpuOptions)
    # How often the runner asks the loader whether the model it attached to is still the
    # one loaded (ModelInfo.generation); 0: never.
    loader_check_seconds: float = 1.0


def layout_from_pb(pb: loader_pb2.GetWeightLayoutResponse) -> WeightLayout:
    return WeightLayout(
        segments=[
            WeightSegment(path=s.path, size_bytes=s.size_bytes,
                          cuda_ipc=cuda_ipc_from_pb(s.cuda_ipc) if s.HasField("cuda_ipc") else None)
            for s in pb.segments
        ],
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


def cuda_ipc_from_pb(pb: loader_pb2.CudaIpcHandle) -> CudaIpcHandle:
    return CudaIpcHandle(
        device_index=pb.device_index, device_uuid=pb.device_uuid, memory_handle=pb.memory_handle,
        storage_size_bytes=pb.storage_size_bytes, storage_offset_bytes=pb.storage_offset_bytes,
        ref_counter_handle=pb.ref_counter_handle, ref_counter_offset=pb.ref_counter_offset,
        event_handle=pb.event_handle, event_sync_required=pb.event_sync_required,
    )


async def attach_to_loader(cfg: RunnerConfig) -> tuple[loader_pb2.ModelInfo, ModelRunner]:
    """Fetch the weight layout from the loader, map it (/dev/shm, or the GPU over CUDA IPC),
    and build the model runner."""
    started = time.perf_counter()
    async with aio_channel(cfg.loader_address, cfg.loader_tls) as channel:
        layout_pb = await loader_pb2_grpc.LoaderServiceStub(channel).GetWeightLayout(
            loader_pb2.GetWeightLayoutRequest(model_id=cfg.model_id), timeout=60
        )
    info = layout_pb.model_info
    layout = layout_from_pb(layout_pb)
    config = json.loads(info.config_json)
    if info.tensor_parallel_size > 1:  # one process per rank (llmexec.runner.tp_runner)
        return info, await attach_tensor_parallel(cfg, info, layout)
    timings = {"layout_rpc": time.perf_counter() - started}
    if layout.segments and layout.segments[0].cuda_ipc is not None:
        weights = attach_cuda_weights(layout)
        device = str(next(iter(weights.values())).device)
        num_blocks = cfg.num_blocks  # 0: sized from the GPU's free memory
    else:
        weights = attach_weights(layout)
        device = "cpu" if cfg.device == "auto" else cfg.device
        num_blocks = cfg.num_blocks or (
            0 if device.startswith("cuda")
            else num_blocks_for_memory(config, cfg.block_size, cfg.kv_cache_bytes, torch.float32)
        )
    timings["map_weights"] = time.perf_counter() - started - timings["layout_rpc"]
    runner = await asyncio.to_thread(
        ModelRunner, config, weights, num_blocks, cfg.block_size, device, None, gpu=cfg.gpu
    )
    timings.update(runner.startup_seconds, total=time.perf_counter() - started)
    log.info("attach timings: %s", json.dumps({k: round(v, 4) for k, v in timings.items()}))
    log.info("attached to %s (%s, generation %s) on %s; KV cache %d blocks x %d tokens", info.model_id,
             info.architecture, info.generation, device, runner.num_blocks, cfg.block_size)
    return info, runner


async def keep_attached(servicer: RunnerServicer, cfg: RunnerConfig, running) -> None:
    """Watch the loader; detach when it is gone or holds another generation of the model
    (it restarted or reloaded: the memory this runner maps is no longer what it serves),
    and attach again once it serves one. While detached, health says NOT_SERVING and steps
    are refused with UNAVAILABLE; the new attachment has a new instance id, so the scheduler
    recomputes its sequences instead of trusting a KV cache that is gone."""
    while True:
        await asyncio.sleep(cfg.loader_check_seconds)
        attached = servicer.model_info
        try:
            async with aio_channel(cfg.loader_address, cfg.loader_tls) as channel:
                reply = await loader_pb2_grpc.LoaderServiceStub(channel).GetModelInfo(
                    loader_pb2.GetModelInfoRequest(model_id=attached.model_id if attached else cfg.model_id),
                    timeout=max(cfg.loader_check_seconds, 1.0),
                )
        except grpc.aio.AioRpcError as exc:
            if attached is not None:
                log.warning("loader %s is gone (%s): detaching from its weights", cfg.loader_address, exc.code().name)
                await running.set_serving(False)
                await servicer.detach()
            continue
        if attached is not None and reply.model_info.generation == attached.generation:
            continue
        if attached is not None:
            log.warning("loader holds generation %s of %s, this runner %s: attaching again",
                        reply.model_info.generation, attached.model_id, attached.generation)
            await running.set_serving(False)
            await servicer.detach()
        try:
            servicer.attach(*await attach_to_loader(cfg))
        except Exception as exc:  # noqa: BLE001 - the loader went away again mid-attach: retry next check
            log.error("attaching to the loader failed: %s", exc)
            continue
        await running.set_serving(True)


class RunnerServicer(runner_pb2_grpc.RunnerServiceServicer):
    """Serves from the moment the port is bound; answers UNAVAILABLE until attach()."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.model_info: loader_pb2.ModelInfo | None = None
        self.runner: ModelRunner | None = None
        # One step started at a time, in order: the KV cache and torch's threads are shared.
        # (Waiting for a step's tokens happens outside it, so the next step is queued on the
        # GPU behind this one while the host waits.)
        self._step_lock = asyncio.Lock()
        self._step_started = asyncio.Condition()  # notified when sampled_tokens.step_id changes
        # A new id per process: a scheduler that planned steps for the KV cache of
        # an earlier runner on this address learns that the cache is gone.
        self.instance_id = uuid.uuid4().hex
        self.token_histories = TokenHistories()
        self.block_tables = BlockTables()
        self.sampled_tokens = SampledTokens()

    def attach(self, model_info: loader_pb2.ModelInfo, runner: ModelRunner) -> None:
        self.model_info, self.runner = model_info, runner
        self.device = str(runner.device)

    async def detach(self) -> None:
        """Drop the model, its weight mapping and the KV cache (after the step in flight).
        The next attachment is a new instance: steps planned for this one are refused."""
        async with self._step_lock:
            runner, self.runner, self.model_info = self.runner, None, None
            self.instance_id = uuid.uuid4().hex
            self.token_histories = TokenHistories()
            self.block_tables = BlockTables()
            self.sampled_tokens = SampledTokens()
            async with self._step_started:  # a step waiting for one it continues gives up now
                self._step_started.notify_all()
            on_cuda = runner is not None and runner.device.type == "cuda"
            del runner
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

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
        if step.continues_step_id:
            await self._wait_for_step(step.continues_step_id)
        started = time.perf_counter()
        async with self._step_lock:
            if self.runner is not runner:  # detached while this step waited: its weights are gone
                raise UnavailableError("the runner detached from the loader's weights; retry once it serves again")
            token_histories = self.token_histories
            try:
                launched = await asyncio.to_thread(self._launch, runner, step)
            finally:
                async with self._step_started:
                    self._step_started.notify_all()
        output = await asyncio.to_thread(launched.result) if launched.waits else launched.result()
        token_histories.fill(step, output.sampled_token_ids)  # over the placeholders of steps queued since
        return step_output_to_pb(output, time.perf_counter() - started)

    async def _wait_for_step(self, step_id: int) -> None:
        """A step planned while step_id ran arrives on its own call, maybe first: let step_id start
        (or the runner detach, which drops what step_id sampled)."""
        sampled_tokens = self.sampled_tokens
        async with self._step_started:
            try:
                await asyncio.wait_for(
                    self._step_started.wait_for(
                        lambda: sampled_tokens.step_id == step_id or self.sampled_tokens is not sampled_tokens
                    ),
                    CONTINUED_STEP_WAIT_S,
                )
            except TimeoutError:
                pass  # sampled_tokens.carried refuses the step, naming what ran last

    def _launch(self, runner: ModelRunner, step) -> LaunchedStep:
        """Queue the step and its sampling (on CUDA the host does not wait for the GPU here).
        A refused step leaves the token histories unchanged, and nothing may continue it."""
        try:
            self.block_tables.resolve(step)  # whole tables from the kept ones plus appended_blocks
            carried = self.sampled_tokens.carried(step)
            logits = runner.execute_logits(step, carried)  # validates first
            unseen = carried is not None and not carried.on_host  # tokens the host has not seen
            histories = self.token_histories.update(step, frozenset(carried.rows) if unseen else frozenset())
            tails = carried.history_tails(step, histories) if unseen else None
            launched = runner.launch_sample(step, logits, histories, tails)
        except Exception:
            self.sampled_tokens.record(step, None)
            raise
        self.sampled_tokens.record(step, launched.tokens)
        return launched

    async def TraceStep(self, request, context):
        runner = self._attached()
        if runner.tensor_parallel is not None:  # its hooks would run on rank 0 alone, out of step with the others
            raise FailedPreconditionError("TraceStep is not supported on a tensor-parallel runner")
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
