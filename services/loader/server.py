"""LoaderService: protobuf in, ModelStore calls, protobuf out."""

from __future__ import annotations

import asyncio

from llmexec.loader.model_inspector import ModelReport, inspect_model
from llmexec.loader.model_store import LoadedModel, ModelStore
from llmexec.v1 import loader_pb2, loader_pb2_grpc


def model_info_to_pb(model: LoadedModel) -> loader_pb2.ModelInfo:
    return loader_pb2.ModelInfo(
        model_id=model.model_id,
        architecture=model.checkpoint.architecture,
        config_json=model.config_json(),
        parameter_count=model.parameter_count,
        bytes_by_dtype=model.weights.bytes_by_dtype,
        source=model.checkpoint.source,
        load_format=model.checkpoint.load_format,
        quantization=model.quantization,
        has_tokenizer=bool(model.tokenizer_files),
        max_model_len=model.max_model_len,
        vocab_size=model.vocab_size,
    )


class LoaderServicer(loader_pb2_grpc.LoaderServiceServicer):
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    async def LoadModel(self, request, context):
        # Loading reads gigabytes; a worker thread keeps health checks and
        # other RPCs answered meanwhile.
        model = await asyncio.to_thread(
            self.store.load, request.model, request.load_format, request.dtype, request.quantization,
            request.quantization_group_size,
        )
        return loader_pb2.LoadModelResponse(model_info=model_info_to_pb(model))

    async def GetModelInfo(self, request, context):
        return loader_pb2.GetModelInfoResponse(model_info=model_info_to_pb(self.store.get(request.model_id)))

    async def GetWeightLayout(self, request, context):
        model = self.store.get(request.model_id)
        layout = model.weights.layout
        return loader_pb2.GetWeightLayoutResponse(
            model_info=model_info_to_pb(model),
            segments=[loader_pb2.WeightSegment(path=s.path, size_bytes=s.size_bytes) for s in layout.segments],
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
            inspect_model, request.model, request.load_format, request.memory_bytes, request.kv_cache_dtype
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
        footprints=[
            loader_pb2.PrecisionFootprint(
                precision=f.precision, weight_bytes=f.weight_bytes, kv_cache_tokens=f.kv_cache_tokens
            )
            for f in report.footprints
        ],
    )
