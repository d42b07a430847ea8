"""LoaderService: protobuf in, ModelStore calls, protobuf out."""

from __future__ import annotations

import asyncio

from llmexec.loader.model_store import LoadedModel, ModelStore
from llmexec.v1 import loader_pb2, loader_pb2_grpc


def model_info_to_pb(model: LoadedModel) -> loader_pb2.ModelInfo:
    return loader_pb2.ModelInfo(
        model_id=model.model_id,
        architecture=model.checkpoint.architecture,
        config_json=model.config_json(),
        parameter_count=model.weights.parameter_count,
        bytes_by_dtype=model.weights.bytes_by_dtype,
        source=model.checkpoint.source,
        load_format=model.checkpoint.load_format,
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
        model = await asyncio.to_thread(self.store.load, request.model, request.load_format, request.dtype)
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
