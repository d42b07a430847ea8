from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "load_format", "dtype", "quantization", "quantization_group_size", "tensor_parallel_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    load_format: str
    dtype: str
    quantization: str
    quantization_group_size: int
    tensor_parallel_size: int
    def __init__(self, model: _Optional[str] = ..., load_format: _Optional[str] = ..., dtype: _Optional[str] = ..., quantization: _Optional[str] = ..., quantization_group_size: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model_info",)
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    model_info: ModelInfo
    def __init__(self, model_info: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "architecture", "config_json", "parameter_count", "bytes_by_dtype", "source", "load_format", "has_tokenizer", "max_model_len", "vocab_size", "quantization", "generation", "device", "tensor_parallel_size")
    class BytesByDtypeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    architecture: str
    config_json: str
    parameter_count: int
    bytes_by_dtype: _containers.ScalarMap[str, int]
    source: str
    load_format: str
    has_tokenizer: bool
    max_model_len: int
    vocab_size: int
    quantization: str
    generation: str
    device: str
    tensor_parallel_size: int
    def __init__(self, model_id: _Optional[str] = ..., architecture: _Optional[str] = ..., config_json: _Optional[str] = ..., parameter_count: _Optional[int] = ..., bytes_by_dtype: _Optional[_Mapping[str, int]] = ..., source: _Optional[str] = ..., load_format: _Optional[str] = ..., has_tokenizer: _Optional[bool] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., quantization: _Optional[str] = ..., generation: _Optional[str] = ..., device: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_info",)
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    model_info: ModelInfo
    def __init__(self, model_info: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class GetWeightLayoutRequest(_message.Message):
    __slots__ = ("model_id", "tensor_parallel_rank")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_RANK_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tensor_parallel_rank: int
    def __init__(self, model_id: _Optional[str] = ..., tensor_parallel_rank: _Optional[int] = ...) -> None: ...

class WeightSegment(_message.Message):
    __slots__ = ("path", "size_bytes", "cuda_ipc")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    cuda_ipc: CudaIpcHandle
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., cuda_ipc: _Optional[_Union[CudaIpcHandle, _Mapping]] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("device_index", "device_uuid", "memory_handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    device_index: int
    device_uuid: str
    memory_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, device_index: _Optional[int] = ..., device_uuid: _Optional[str] = ..., memory_handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class TensorLocation(_message.Message):
    __slots__ = ("name", "dtype", "shape", "segment_index", "offset_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    segment_index: int
    offset_bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., segment_index: _Optional[int] = ..., offset_bytes: _Optional[int] = ...) -> None: ...

class GetWeightLayoutResponse(_message.Message):
    __slots__ = ("model_info", "segments", "tensors")
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model_info: ModelInfo
    segments: _containers.RepeatedCompositeFieldContainer[WeightSegment]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorLocation]
    def __init__(self, model_info: _Optional[_Union[ModelInfo, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[WeightSegment, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorLocation, _Mapping]]] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class InspectModelRequest(_message.Message):
    __slots__ = ("model", "load_format", "memory_bytes", "kv_cache_dtype", "tensor_parallel_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    load_format: str
    memory_bytes: int
    kv_cache_dtype: str
    tensor_parallel_size: int
    def __init__(self, model: _Optional[str] = ..., load_format: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class ParameterGroup(_message.Message):
    __slots__ = ("layer_type", "parameter_count", "share")
    LAYER_TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    layer_type: str
    parameter_count: int
    share: float
    def __init__(self, layer_type: _Optional[str] = ..., parameter_count: _Optional[int] = ..., share: _Optional[float] = ...) -> None: ...

class PrecisionFootprint(_message.Message):
    __slots__ = ("precision", "weight_bytes", "kv_cache_tokens")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    precision: str
    weight_bytes: int
    kv_cache_tokens: int
    def __init__(self, precision: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., kv_cache_tokens: _Optional[int] = ...) -> None: ...

class InspectModelResponse(_message.Message):
    __slots__ = ("source", "architecture", "parameter_source", "load_format", "parameter_count", "parameter_groups", "num_layers", "num_kv_heads", "head_dim", "kv_cache_dtype", "kv_cache_bytes_per_token", "memory_bytes", "footprints", "tensor_parallel_size", "rank_parameter_count", "rank_kv_cache_bytes_per_token", "rank_footprints")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINTS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    RANK_KV_CACHE_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RANK_FOOTPRINTS_FIELD_NUMBER: _ClassVar[int]
    source: str
    architecture: str
    parameter_source: str
    load_format: str
    parameter_count: int
    parameter_groups: _containers.RepeatedCompositeFieldContainer[ParameterGroup]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_cache_dtype: str
    kv_cache_bytes_per_token: int
    memory_bytes: int
    footprints: _containers.RepeatedCompositeFieldContainer[PrecisionFootprint]
    tensor_parallel_size: int
    rank_parameter_count: int
    rank_kv_cache_bytes_per_token: int
    rank_footprints: _containers.RepeatedCompositeFieldContainer[PrecisionFootprint]
    def __init__(self, source: _Optional[str] = ..., architecture: _Optional[str] = ..., parameter_source: _Optional[str] = ..., load_format: _Optional[str] = ..., parameter_count: _Optional[int] = ..., parameter_groups: _Optional[_Iterable[_Union[ParameterGroup, _Mapping]]] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., kv_cache_bytes_per_token: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., footprints: _Optional[_Iterable[_Union[PrecisionFootprint, _Mapping]]] = ..., tensor_parallel_size: _Optional[int] = ..., rank_parameter_count: _Optional[int] = ..., rank_kv_cache_bytes_per_token: _Optional[int] = ..., rank_footprints: _Optional[_Iterable[_Union[PrecisionFootprint, _Mapping]]] = ...) -> None: ...

class GetTokenizerResponse(_message.Message):
    __slots__ = ("files",)
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.ScalarMap[str, bytes]
    def __init__(self, files: _Optional[_Mapping[str, bytes]] = ...) -> None: ...
