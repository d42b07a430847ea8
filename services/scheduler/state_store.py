"""Every sequence's state, kept in Redis so it survives the scheduler.

Keys, for prefix P and request id R:
    P:seq:R       hash: request_id, prompt_token_ids (JSON), sampling_params (JSON),
                  status, block_table (JSON), num_computed_tokens, arrival_time
    P:seq:R:out   list: the generated token ids, in order (RPUSHed as they come)
    P:active      set: the request ids of unfinished sequences
Finished sequences leave the active set and their keys expire after
finished_ttl_s, so clients can still look them up for a while.

The per-step update is one pipelined MULTI/EXEC round trip for all sequences
of the step, whatever their number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from llmexec.scheduler.sequence import Sequence

DEFAULT_FINISHED_TTL_S = 3600


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SequenceStore:
    def __init__(self, redis_client, prefix: str = "llmexec", finished_ttl_s: int = DEFAULT_FINISHED_TTL_S):
        """redis_client: a redis.Redis (decode_responses either way)."""
        self.redis = redis_client
        self.prefix = prefix
        self.finished_ttl_s = finished_ttl_s
        self.active_key = f"{prefix}:active"
        # How many output tokens of each sequence Redis already has, so a step
        # pushes only the new ones.
        self._num_saved_outputs: dict[str, int] = {}

    def seq_key(self, request_id: str) -> str:
        return f"{self.prefix}:seq:{request_id}"

    def output_key(self, request_id: str) -> str:
        return f"{self.prefix}:seq:{request_id}:out"

    def save(self, seq: Sequence) -> None:
        """Write seq's full record, replacing any earlier one."""
        pipe = self.redis.pipeline(transaction=True)
        self._queue_full_record(pipe, seq)
        pipe.execute()
        self._remember(seq)

    def save_step(self, seqs: Iterable[Sequence]) -> None:
        """Persist one step's changes of seqs in one round trip: new output
        tokens, status, block table, num_computed_tokens. Sequences this store
        has not saved yet get their full record."""
        seqs = list({seq.request_id: seq for seq in seqs}.values())  # each pushed once
        if not seqs:
            return
        pipe = self.redis.pipeline(transaction=True)
        for seq in seqs:
            num_saved = self._num_saved_outputs.get(seq.request_id)
            if num_saved is None or num_saved > seq.num_output_tokens:
                self._queue_full_record(pipe, seq)
                continue
            new_tokens = seq.output_token_ids[num_saved:]
            if new_tokens:
                pipe.rpush(self.output_key(seq.request_id), *new_tokens)
            pipe.hset(self.seq_key(seq.request_id), mapping=self._state_fields(seq))
            self._queue_lifetime(pipe, seq)
        pipe.execute()
        for seq in seqs:
            self._remember(seq)

    def load(self, request_id: str) -> Sequence | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.seq_key(request_id))
        pipe.lrange(self.output_key(request_id), 0, -1)
        fields, outputs = pipe.execute()
        seq = self._to_sequence(fields, outputs)
        if seq is not None:
            self._remember(seq)
        return seq

    def delete(self, request_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.seq_key(request_id), self.output_key(request_id))
        pipe.srem(self.active_key, request_id)
        pipe.execute()
        self._num_saved_outputs.pop(request_id, None)

    def active_ids(self) -> set[str]:
        """The request ids of unfinished sequences."""
        return {_str(m) for m in self.redis.smembers(self.active_key)}

    def load_active(self) -> list[Sequence]:
        """All unfinished sequences, oldest first (two round trips)."""
        ids = sorted(self.active_ids())
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for request_id in ids:
            pipe.hgetall(self.seq_key(request_id))
            pipe.lrange(self.output_key(request_id), 0, -1)
        replies = pipe.execute()
        seqs = [self._to_sequence(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]
        seqs = sorted((s for s in seqs if s is not None), key=lambda s: s.arrival_time)
        for seq in seqs:
            self._remember(seq)
        return seqs

    def _queue_full_record(self, pipe, seq: Sequence) -> None:
        key, out_key = self.seq_key(seq.request_id), self.output_key(seq.request_id)
        pipe.delete(key, out_key)
        pipe.hset(
            key,
            mapping={
                "request_id": seq.request_id,
                "prompt_token_ids": json.dumps(seq.prompt_token_ids),
                "sampling_params": json.dumps(seq.sampling_params.to_dict()),
                "arrival_time": repr(seq.arrival_time),
                **self._state_fields(seq),
            },
        )
        if seq.output_token_ids:
            pipe.rpush(out_key, *seq.output_token_ids)
        self._queue_lifetime(pipe, seq)

    def _queue_lifetime(self, pipe, seq: Sequence) -> None:
        keys = (self.seq_key(seq.request_id), self.output_key(seq.request_id))
        if seq.is_finished:
            pipe.srem(self.active_key, seq.request_id)
            for key in keys:
                pipe.expire(key, self.finished_ttl_s)
        else:
            pipe.sadd(self.active_key, seq.request_id)

    def _remember(self, seq: Sequence) -> None:
        """Note what Redis now holds, once the write went through."""
        if seq.is_finished:  # nothing more will be pushed for it
            self._num_saved_outputs.pop(seq.request_id, None)
        else:
            self._num_saved_outputs[seq.request_id] = seq.num_output_tokens

    @staticmethod
    def _state_fields(seq: Sequence) -> dict:
        return {
            "status": seq.status.value,
            "block_table": json.dumps(seq.block_table),
            "num_computed_tokens": seq.num_computed_tokens,
        }

    @staticmethod
    def _to_sequence(fields: dict, outputs: list) -> Sequence | None:
        if not fields:
            return None
        fields = {_str(k): _str(v) for k, v in fields.items()}
        return Sequence.from_record(
            {
                "request_id": fields["request_id"],
                "prompt_token_ids": json.loads(fields["prompt_token_ids"]),
                "output_token_ids": [int(_str(t)) for t in outputs],
                "sampling_params": json.loads(fields["sampling_params"]),
                "status": fields["status"],
                "block_table": json.loads(fields["block_table"]),
                "num_computed_tokens": int(fields["num_computed_tokens"]),
                "arrival_time": float(fields["arrival_time"]),
            }
        )
