"""Protobuf <-> plain Python for the types that cross more than one service.

SamplingParams travels client -> scheduler -> runner and StepInput travels
scheduler -> runner; both directions live here so the two ends cannot drift.
"""

from __future__ import annotations

from llmexec.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams
from llmexec.step import SequenceInput, StepInput, StepOutput, TokenLogprobs
from llmexec.v1 import runner_pb2, sampling_pb2


def sampling_from_pb(pb: sampling_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take the defaults; invalid values raise InvalidArgumentError."""

    def get(name: str, default):
        return getattr(pb, name) if pb.HasField(name) else default

    return SamplingParams(
        temperature=get("temperature", 1.0),
        top_p=get("top_p", 1.0),
        top_k=get("top_k", 0),
        min_p=get("min_p", 0.0),
        max_tokens=get("max_tokens", DEFAULT_MAX_TOKENS),
        min_tokens=get("min_tokens", 0),
        seed=get("seed", None),
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        repetition_penalty=get("repetition_penalty", 1.0),
        presence_penalty=get("presence_penalty", 0.0),
        frequency_penalty=get("frequency_penalty", 0.0),
        logprobs=get("logprobs", None),
        n=get("n", 1),
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
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        min_tokens=params.min_tokens,
        n=params.n,
    )
    if params.seed is not None:
        pb.seed = params.seed
    if params.logprobs is not None:
        pb.logprobs = params.logprobs
    return pb


def logprobs_to_pb(lp: TokenLogprobs) -> sampling_pb2.TokenLogprobs:
    return sampling_pb2.TokenLogprobs(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                                      top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)


def logprobs_from_pb(pb: sampling_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(token_id=pb.token_id, logprob=pb.logprob, rank=pb.rank,
                         top_token_ids=list(pb.top_token_ids), top_logprobs=list(pb.top_logprobs))


def step_output_to_pb(output: StepOutput, execute_seconds: float = 0.0) -> runner_pb2.ExecuteStepResponse:
    """Logprobs travel only for the sequences that asked (step_output_from_pb realigns them)."""
    return runner_pb2.ExecuteStepResponse(
        sampled_token_ids=output.sampled_token_ids,
        execute_seconds=execute_seconds,
        logprobs=[logprobs_to_pb(lp) for lp in output.logprobs if lp is not None],
    )


def step_output_from_pb(pb: runner_pb2.ExecuteStepResponse, step: StepInput) -> StepOutput:
    asked = [s.sampling_params.logprobs is not None for s in step.sequences if s.needs_sample]
    received = iter(pb.logprobs)
    return StepOutput(
        sampled_token_ids=list(pb.sampled_token_ids),
        logprobs=[logprobs_from_pb(next(received)) if a else None for a in asked] if pb.logprobs else [],
    )


def step_to_pb(step: StepInput) -> runner_pb2.ExecuteStepRequest:
    params: dict[SamplingParams, sampling_pb2.SamplingParams] = {}  # each distinct one converted once

    def sampling(value: SamplingParams) -> sampling_pb2.SamplingParams:
        if value not in params:
            params[value] = sampling_to_pb(value)
        return params[value]

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
                # A runner extending a table it holds keeps the params it got with the whole table.
                sampling_params=sampling(s.sampling_params) if s.appended_blocks is None else None,
                output_index=s.output_index,
                seq_id=s.seq_id,
                context_token_ids=s.context_token_ids or (),
                block_table_id=s.block_table_id,
                appended_blocks=s.appended_blocks or (),
            )
            for s in step.sequences
        ],
        finished_seq_ids=step.finished_seq_ids,
        eos_token_ids=step.eos_token_ids,
        runner_instance_id=step.runner_instance_id,
        step_id=step.step_id,
        continues_step_id=step.continues_step_id,
    )


def step_from_pb(pb: runner_pb2.ExecuteStepRequest) -> StepInput:
    # Most sequences of a batch share their sampling params: convert each distinct message once
    # (a field-by-field conversion costs ~10x its serialization; at batch 256 that was ~3 ms a step).
    params: dict[bytes, SamplingParams] = {}

    def sampling(message: sampling_pb2.SamplingParams) -> SamplingParams:
        key = message.SerializeToString(deterministic=True)
        if key not in params:
            params[key] = sampling_from_pb(message)
        return params[key]

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
                # None: the runner's BlockTables fills in the params it keeps for block_table_id.
                sampling_params=sampling(s.sampling_params) if s.HasField("sampling_params") else None,
                output_index=s.output_index,
                seq_id=s.seq_id,
                # An empty context is the same as none: both mean "nothing before the query".
                context_token_ids=list(s.context_token_ids) or None,
                block_table_id=s.block_table_id,
                # A whole table is never empty (seq_len > 0): empty means "extend the runner's".
                appended_blocks=list(s.appended_blocks) if s.block_table_id and not s.block_table else None,
            )
            for s in pb.sequences
        ],
        finished_seq_ids=list(pb.finished_seq_ids),
        eos_token_ids=list(pb.eos_token_ids),
        runner_instance_id=pb.runner_instance_id,
        step_id=pb.step_id,
        continues_step_id=pb.continues_step_id,
    )
