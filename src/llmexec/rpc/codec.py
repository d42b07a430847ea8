"""Protobuf <-> plain Python for the types that cross more than one service.

SamplingParams travels client -> scheduler -> runner and StepInput travels
scheduler -> runner; both directions live here so the two ends cannot drift.
"""

from __future__ import annotations

from llmexec.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams
from llmexec.step import SequenceInput, StepInput
from llmexec.v1 import runner_pb2, sampling_pb2


def sampling_from_pb(pb: sampling_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take the defaults; invalid values raise InvalidArgumentError."""
    return SamplingParams(
        temperature=pb.temperature if pb.HasField("temperature") else 1.0,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k if pb.HasField("top_k") else 0,
        max_tokens=pb.max_tokens if pb.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
    )


def sampling_to_pb(params: SamplingParams) -> sampling_pb2.SamplingParams:
    pb = sampling_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def step_to_pb(step: StepInput) -> runner_pb2.ExecuteStepRequest:
    return runner_pb2.ExecuteStepRequest(
        input_ids=step.input_ids,
        positions=step.positions,
        slot_mapping=step.slot_mapping,
        sequences=[
            runner_pb2.SequenceInput(
                query_len=s.query_len,
                seq_len=s.seq_len,
                block_table=s.block_table,
                needs_sample=s.needs_sample,
                sampling_params=sampling_to_pb(s.sampling_params),
                output_index=s.output_index,
            )
            for s in step.sequences
        ],
    )


def step_from_pb(pb: runner_pb2.ExecuteStepRequest) -> StepInput:
    return StepInput(
        input_ids=list(pb.input_ids),
        positions=list(pb.positions),
        slot_mapping=list(pb.slot_mapping),
        sequences=[
            SequenceInput(
                query_len=s.query_len,
                seq_len=s.seq_len,
                block_table=list(s.block_table),
                needs_sample=s.needs_sample,
                sampling_params=sampling_from_pb(s.sampling_params),
                output_index=s.output_index,
            )
            for s in pb.sequences
        ],
    )
