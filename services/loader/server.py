"""LoaderService: protobuf in, ModelStore calls, protobuf out."""

from __future__ import annotations

import asyncio
import dataclasses

from llmexec.loader.model_inspector import ModelReport, inspect_model
from llmexec.loader.model_store import LoadedModel, ModelStore
from llmexec.v1 import loader_pb2, loader_pb2_grpc
from llmexec.weight_layout import CudaIpcHandle


def model_info_to_pb(model: LoadedModel) -> loader_pb2.ModelInfo:
    return loader_pb2.ModelInfo(
        model_id=model.model_id,
        architecture=model.checkpoint.architecture,
        config_json=model.config_json(),
        parameter_count=model.parameter_count,
        bytes_by_dtype=_bytes_by_dtype(model),
        source=model.checkpoint.source,
        load_format=model.checkpoint.load_format,
        quantization=model.quantization,
        has_tokenizer=bool(model.tokenizer_files),
        max_model_len=model.max_model_len,
        vocab_size=model.vocab_size,
        generation=model.generation,
        device=model.device,
        tensor_parallel_size=model.tensor_parallel_size,
    )


def _bytes_by_dtype(model: LoadedModel) -> dict[str, int]:
    """Over all ranks' shards when the model is split (replicated tensors counted on each)."""
    totals: dict[str, int] = {}
    for weights in model.rank_weights or [model.weights]:
        for dtype, nbytes in weights.bytes_by_dtype.items():
            totals[dtype] = totals.get(dtype, 0) + nbytes
    return totals


def cuda_ipc_to_pb(handle: CudaIpcHandle) -> loader_pb2.CudaIpcHandle:
    return loader_pb2.CudaIpcHandle(**dataclasses.asdict(handle))


class LoaderServicer(loader_pb2_grpc.LoaderServiceServicer):
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    async def LoadModel(self, request, context):
        # Loading reads gigabytes; a worker thread keeps health checks and
        # other RPCs answered meanwhile.
        model = await asyncio.to_thread(
            self.store.load, request.model, request.load_format, request.dtype, request.quantization,
            request.quantization_group_size, request.tensor_parallel_size,
        )
        return loader_pb2.LoadModelResponse(model_info=model_info_to_pb(model))

    async def GetModelInfo(self, request, context):
        return loader_pb2.GetModelInfoResponse(model_info=model_info_to_pb(self.store.get(request.model_id)))

    async def GetWeightLayout(self, request, context):
        model = self.store.get(request.model_id)
        layout = model.weights_of_rank(request.tensor_parallel_rank).layout
        export = getattr(model.weights, "export_cuda_ipc", None)  # GPU weights: a fresh handle per caller
        cuda_ipc = cuda_ipc_to_pb(export()) if export is not None else None
        return loader_pb2.GetWeightLayoutResponse(
            model_info=model_info_to_pb(model),
            segments=[
                loader_pb2.WeightSegment(path=s.path, size_bytes=s.size_bytes, cuda_ipc=cuda_ipc)
                for s in layout.segments
            ],
            tensors=[
                loader_pb2.TensorLocation(
                    name=t.name,
                    dtype=t.dtype,
                    shape=list(t.shape),
                    segment_index=t.segment_index,
                    offset_bytes=t.offset_bytes,
                )
                for t in layout.tensors
            ],
        )

    async def GetTokenizer(self, request, context):
        return loader_pb2.GetTokenizerResponse(files=self.store.get(request.model_id).tokenizer_files)

    async def InspectModel(self, request, context):
        # Reads headers (or builds a meta model from a config): off the event loop too.
        report = await asyncio.to_thread(
            inspect_model, request.model, request.load_format, request.memory_bytes, request.kv_cache_dtype,
            request.tensor_parallel_size or 1,
        )
        return report_to_pb(report)


def report_to_pb(report: ModelReport) -> loader_pb2.InspectModelResponse:
    return loader_pb2.InspectModelResponse(
        source=report.source,
        architecture=report.architecture,
        parameter_source=report.parameter_source,
        load_format=report.load_format,
        parameter_count=report.parameter_count,
        parameter_groups=[
            loader_pb2.ParameterGroup(layer_type=g.layer_type, parameter_count=g.parameter_count, share=g.share)
            for g in report.parameter_groups
        ],
        num_layers=report.num_layers,
        num_kv_heads=report.num_kv_heads,
        head_dim=report.head_dim,
        kv_cache_dtype=report.kv_cache_dtype,
        kv_cache_bytes_per_token=report.kv_cache_bytes_per_token,
        memory_bytes=report.memory_bytes,
        footprints=[_footprint_to_pb(f) for f in report.footprints],
        tensor_parallel_size=report.tensor_parallel_size,
        rank_parameter_count=report.rank_parameter_count,
        rank_kv_cache_bytes_per_token=report.rank_kv_cache_bytes_per_token,
        rank_footprints=[_footprint_to_pb(f) for f in report.rank_footprints],
    )


def _footprint_to_pb(footprint) -> loader_pb2.PrecisionFootprint:
    return loader_pb2.PrecisionFootprint(
        precision=footprint.precision, weight_bytes=footprint.weight_bytes, kv_cache_tokens=footprint.kv_cache_tokens
    )
