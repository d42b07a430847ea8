from llmexec.v1 import loader_pb2 as _loader_pb2
from llmexec.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRunnerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WeightAddress(_message.Message):
    __slots__ = ("name", "data_ptr", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_PTR_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    data_ptr: int
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., data_ptr: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetRunnerInfoResponse(_message.Message):
    __slots__ = ("model_info", "num_blocks", "block_size", "device", "kv_cache_dtype", "weight_addresses", "pid", "instance_id")
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    model_info: _loader_pb2.ModelInfo
    num_blocks: int
    block_size: int
    device: str
    kv_cache_dtype: str
    weight_addresses: _containers.RepeatedCompositeFieldContainer[WeightAddress]
    pid: int
    instance_id: str
    def __init__(self, model_info: _Optional[_Union[_loader_pb2.ModelInfo, _Mapping]] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., device: _Optional[str] = ..., kv_cache_dtype: _Optional[str] = ..., weight_addresses: _Optional[_Iterable[_Union[WeightAddress, _Mapping]]] = ..., pid: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class SequenceInput(_message.Message):
    __slots__ = ("query_len", "seq_len", "block_table", "needs_sample", "sampling_params", "output_index", "seq_id", "context_token_ids", "block_table_id", "appended_blocks")
    QUERY_LEN_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    NEEDS_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_ID_FIELD_NUMBER: _ClassVar[int]
    APPENDED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    query_len: int
    seq_len: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    needs_sample: bool
    sampling_params: _sampling_pb2.SamplingParams
    output_index: int
    seq_id: str
    context_token_ids: _containers.RepeatedScalarFieldContainer[int]
    block_table_id: str
    appended_blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, query_len: _Optional[int] = ..., seq_len: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., needs_sample: _Optional[bool] = ..., sampling_params: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., output_index: _Optional[int] = ..., seq_id: _Optional[str] = ..., context_token_ids: _Optional[_Iterable[int]] = ..., block_table_id: _Optional[str] = ..., appended_blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class ExecuteStepRequest(_message.Message):
    __slots__ = ("input_ids", "positions", "slot_mapping", "sequences", "finished_seq_ids", "eos_token_ids", "runner_instance_id", "step_id", "continues_step_id")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAPPING_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RUNNER_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUES_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    slot_mapping: _containers.RepeatedScalarFieldContainer[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceInput]
    finished_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    runner_instance_id: str
    step_id: int
    continues_step_id: int
    def __init__(self, input_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., slot_mapping: _Optional[_Iterable[int]] = ..., sequences: _Optional[_Iterable[_Union[SequenceInput, _Mapping]]] = ..., finished_seq_ids: _Optional[_Iterable[str]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., runner_instance_id: _Optional[str] = ..., step_id: _Optional[int] = ..., continues_step_id: _Optional[int] = ...) -> None: ...

class ExecuteStepResponse(_message.Message):
    __slots__ = ("sampled_token_ids", "execute_seconds", "logprobs")
    SAMPLED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    sampled_token_ids: _containers.RepeatedScalarFieldContainer[int]
    execute_seconds: float
    logprobs: _containers.RepeatedCompositeFieldContainer[_sampling_pb2.TokenLogprobs]
    def __init__(self, sampled_token_ids: _Optional[_Iterable[int]] = ..., execute_seconds: _Optional[float] = ..., logprobs: _Optional[_Iterable[_Union[_sampling_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class TraceStepRequest(_message.Message):
    __slots__ = ("prompt_token_ids",)
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("shape", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class ModuleCall(_message.Message):
    __slots__ = ("index", "name", "class_name", "depth", "inputs", "outputs", "seconds", "self_seconds")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    class_name: str
    depth: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    seconds: float
    self_seconds: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., class_name: _Optional[str] = ..., depth: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., seconds: _Optional[float] = ..., self_seconds: _Optional[float] = ...) -> None: ...

class TraceStage(_message.Message):
    __slots__ = ("stage", "num_tokens", "calls", "sampled_token_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    stage: str
    num_tokens: int
    calls: _containers.RepeatedCompositeFieldContainer[ModuleCall]
    sampled_token_id: int
    def __init__(self, stage: _Optional[str] = ..., num_tokens: _Optional[int] = ..., calls: _Optional[_Iterable[_Union[ModuleCall, _Mapping]]] = ..., sampled_token_id: _Optional[int] = ...) -> None: ...

class TraceStepResponse(_message.Message):
    __slots__ = ("stages", "architecture")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[TraceStage]
    architecture: str
    def __init__(self, stages: _Optional[_Iterable[_Union[TraceStage, _Mapping]]] = ..., architecture: _Optional[str] = ...) -> None: ...
