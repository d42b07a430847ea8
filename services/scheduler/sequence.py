"""One completion's tokens and its place in the scheduler's lifecycle.

A Sequence is plain Python: the scheduler mutates it, the state store turns it
into a JSON-safe record and back. Token layout: all_token_ids = prompt_token_ids
+ output_token_ids; the KV of the first num_computed_tokens of them is in the
cache, in the slots named by block_table.

A request asking for n completions becomes n sequences that share the prompt
(and, through the prefix cache, its KV blocks): sequence i has request_id
completion_id(group_id, i, n) and index i; with n == 1 the request id is the
client's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from llmexec.sampling_params import SamplingParams
from llmexec.step import TokenLogprobs


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"


# The finish reasons a caller reports (they map onto the proto's FinishReason).
FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}
FINISHED_STATUS = {reason: status for status, reason in FINISH_REASONS.items()}
COMPLETION_SEPARATOR = "#"  # request ids may not contain it


def completion_id(group_id: str, index: int, n: int) -> str:
    """The request_id of completion `index` of a request asking for n."""
    return group_id if n == 1 else f"{group_id}{COMPLETION_SEPARATOR}{index}"


@dataclass(eq=False)  # identity: two requests with equal tokens are still two requests
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0  # lower runs first and is preempted last (vLLM's convention)
    group_id: str = ""  # the client's request id ("" means request_id)
    index: int = 0  # which of the request's n completions
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when admitted
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # when sampling_params.logprobs is set
    # Working state, rebuilt rather than stored:
    block_hashes: list[bytes] = field(default_factory=list, repr=False)  # of full blocks, in order
    num_registered_blocks: int = field(default=0, repr=False)  # leading blocks offered to the prefix cache
    runner_has_history: bool = field(default=False, repr=False)  # the runner holds its token history
    # Leading blocks of block_table the runner holds under this request_id (0: none, send it whole).
    runner_num_blocks: int = field(default=0, repr=False)
    admission_no: int = field(default=0, repr=False)  # breaks arrival-time ties, in add() order

    def __post_init__(self) -> None:
        if not self.group_id:
            self.group_id = self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status in FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", "abort", or None while unfinished."""
        return FINISH_REASONS.get(self.status)

    def token_ids_from(self, start: int) -> list[int]:
        """all_token_ids[start:] without copying the whole prompt for a decode."""
        return self.token_ids_slice(start, self.num_tokens)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the two lists."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def to_record(self) -> dict:
        """A JSON-safe dict; from_record(to_record()) gives an equal sequence."""
        return {
            "request_id": self.request_id,
            "prompt_token_ids": list(self.prompt_token_ids),
            "output_token_ids": list(self.output_token_ids),
            "sampling_params": self.sampling_params.to_dict(),
            "status": self.status.value,
            "block_table": list(self.block_table),
            "num_computed_tokens": self.num_computed_tokens,
            "arrival_time": self.arrival_time,
            "priority": self.priority,
            "group_id": self.group_id,
            "index": self.index,
            "num_cached_tokens": self.num_cached_tokens,
            "output_logprobs": [lp.to_dict() for lp in self.output_logprobs],
        }

    @classmethod
    def from_record(cls, record: dict) -> Sequence:
        return cls(
            request_id=str(record["request_id"]),
            prompt_token_ids=[int(t) for t in record["prompt_token_ids"]],
            output_token_ids=[int(t) for t in record.get("output_token_ids", ())],
            sampling_params=SamplingParams.from_dict(record.get("sampling_params", {})),
            status=SequenceStatus(record.get("status", SequenceStatus.WAITING.value)),
            block_table=[int(b) for b in record.get("block_table", ())],
            num_computed_tokens=int(record.get("num_computed_tokens", 0)),
            arrival_time=float(record.get("arrival_time", 0.0)),
            priority=int(record.get("priority", 0)),
            group_id=str(record.get("group_id", "")),
            index=int(record.get("index", 0)),
            num_cached_tokens=int(record.get("num_cached_tokens", 0)),
            output_logprobs=[TokenLogprobs.from_dict(d) for d in record.get("output_logprobs", ())],
        )
