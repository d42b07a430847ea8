"""Every sequence's state, kept in Redis so it survives the scheduler.

Key schema (prefix P, default "llmexec"; R is a sequence's request_id, which
is the client's request id G when it asked for one completion, else G#i for
completion i of n):

    P:seq:R            hash, written whole when the sequence is first saved:
                         request_id, group_id (G), index (i), priority,
                         prompt_token_ids (JSON list), sampling_params (JSON
                         object, SamplingParams.to_dict()), arrival_time (unix s),
                       and whenever one of them changes (a status change, a block
                       added or freed, admission, finishing):
                         status (waiting | running | finished_stopped |
                         finished_length | finished_aborted), block_table (JSON),
                         num_uncomputed_tokens (prompt + output tokens not yet in
                         the KV cache: 1 for a decoding sequence, so decode steps
                         need not rewrite it), num_cached_tokens
                       (records written before num_uncomputed_tokens have
                       num_computed_tokens instead, still read)
    P:seq:R:out        list: the generated token ids, in order (RPUSHed as they come)
    P:seq:R:logprobs   list: one JSON TokenLogprobs per generated token, only when
                       sampling_params.logprobs is set
    P:active           set: the request ids of unfinished sequences

Finished sequences leave the active set and their keys expire after
finished_ttl_s (an hour), so clients can still resume them for a while.
block_table and num_computed_tokens describe the KV cache of the scheduler
that wrote them; a restarted scheduler recomputes from the tokens instead.

Durability: the engine saves a step's changes before any client sees them,
all sequences of the step in one pipelined MULTI/EXEC round trip, whatever
their number, so what a client has received is always in Redis. A steady
decode step costs one command per sequence (the RPUSH of its new token, plus
one for its logprobs when asked): the hash and the active set are written only
when the state fields change, which keeps the scheduler's single thread off
redis-py's command packing (issue 6: ~3 commands per sequence cost ~20 ms a
step at batch 256). Against a
Redis with appendonly (the stack's), it survives Redis restarts too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable

from llmexec.scheduler.sequence import Sequence, completion_id

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
        # pushes only the new ones, and the state fields Redis has for it, so a
        # step rewrites them only when they changed.
        self._num_saved_outputs: dict[str, int] = {}
        self._saved_state: dict[str, tuple] = {}
        # save_step runs in a worker thread for the step loop and on the event loop for aborts
        # and new requests: one at a time, so a sequence's new tokens are pushed once.
        self._write_lock = threading.Lock()

    def seq_key(self, request_id: str) -> str:
        return f"{self.prefix}:seq:{request_id}"

    def output_key(self, request_id: str) -> str:
        return f"{self.prefix}:seq:{request_id}:out"

    def logprobs_key(self, request_id: str) -> str:
        return f"{self.prefix}:seq:{request_id}:logprobs"

    def save(self, seq: Sequence) -> None:
        """Write seq's full record, replacing any earlier one."""
        pipe = self.redis.pipeline(transaction=True)
        self._queue_full_record(pipe, seq)
        pipe.execute()
        self._remember(seq)

    def save_step(self, seqs: Iterable[Sequence]) -> None:
        """Persist one step's changes of seqs in one round trip: new output
        tokens, and the state fields (status, block table, computed and cached
        token counts) of the sequences whose state changed. Sequences this store
        has not saved yet get their full record."""
        seqs = list({seq.request_id: seq for seq in seqs}.values())  # each pushed once
        if not seqs:
            return
        with self._write_lock:
            self._save_step(seqs)

    def _save_step(self, seqs: list[Sequence]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for seq in seqs:
            num_saved = self._num_saved_outputs.get(seq.request_id)
            if num_saved is None or num_saved > seq.num_output_tokens:
                self._queue_full_record(pipe, seq)
                continue
            if num_saved < seq.num_output_tokens:
                pipe.rpush(self.output_key(seq.request_id), *seq.output_token_ids[num_saved:])
                new_logprobs = seq.output_logprobs[num_saved:]
                if new_logprobs:
                    pipe.rpush(self.logprobs_key(seq.request_id), *(json.dumps(lp.to_dict()) for lp in new_logprobs))
            saved = self._saved_state.get(seq.request_id)
            if saved is None or not self._same_state(saved, seq):
                pipe.hset(self.seq_key(seq.request_id), mapping=self._state_fields(seq))
                if saved is None or saved[0] is not seq.status:
                    self._queue_lifetime(pipe, seq)
        pipe.execute()
        for seq in seqs:
            self._remember(seq)

    def load(self, request_id: str) -> Sequence | None:
        seqs = self.load_many([request_id])
        return seqs[0] if seqs else None

    def load_many(self, request_ids: list[str]) -> list[Sequence]:
        """The stored ones of request_ids, in that order (one round trip)."""
        if not request_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hgetall(self.seq_key(request_id))
            pipe.lrange(self.output_key(request_id), 0, -1)
            pipe.lrange(self.logprobs_key(request_id), 0, -1)
        replies = pipe.execute()
        seqs = [self._to_sequence(*replies[i : i + 3]) for i in range(0, len(replies), 3)]
        seqs = [s for s in seqs if s is not None]
        for seq in seqs:
            self._remember(seq)
        return seqs

    def load_request(self, group_id: str) -> list[Sequence]:
        """Every completion of the client request group_id, by index; [] if unknown."""
        single = self.load(group_id)
        if single is not None:
            return [single]
        first = self.load(completion_id(group_id, 0, 2))
        if first is None:
            return []
        n = first.sampling_params.n
        return [first] + self.load_many([completion_id(group_id, i, n) for i in range(1, n)])

    def delete(self, request_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.seq_key(request_id), self.output_key(request_id), self.logprobs_key(request_id))
        pipe.srem(self.active_key, request_id)
        pipe.execute()
        self._num_saved_outputs.pop(request_id, None)
        self._saved_state.pop(request_id, None)

    def active_ids(self) -> set[str]:
        """The request ids of unfinished sequences."""
        return {_str(m) for m in self.redis.smembers(self.active_key)}

    def load_active(self) -> list[Sequence]:
        """All unfinished sequences, oldest first (two round trips)."""
        return sorted(self.load_many(sorted(self.active_ids())), key=lambda s: s.arrival_time)

    def _queue_full_record(self, pipe, seq: Sequence) -> None:
        key, out_key, lp_key = (self.seq_key(seq.request_id), self.output_key(seq.request_id),
                                self.logprobs_key(seq.request_id))
        pipe.delete(key, out_key, lp_key)
        pipe.hset(
            key,
            mapping={
                "request_id": seq.request_id,
                "group_id": seq.group_id,
                "index": seq.index,
                "priority": seq.priority,
                "prompt_token_ids": json.dumps(seq.prompt_token_ids),
                "sampling_params": json.dumps(seq.sampling_params.to_dict()),
                "arrival_time": repr(seq.arrival_time),
                **self._state_fields(seq),
            },
        )
        if seq.output_token_ids:
            pipe.rpush(out_key, *seq.output_token_ids)
        if seq.output_logprobs:
            pipe.rpush(lp_key, *(json.dumps(lp.to_dict()) for lp in seq.output_logprobs))
        self._queue_lifetime(pipe, seq)

    def _queue_lifetime(self, pipe, seq: Sequence) -> None:
        keys = (self.seq_key(seq.request_id), self.output_key(seq.request_id), self.logprobs_key(seq.request_id))
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
            self._saved_state.pop(seq.request_id, None)
        else:
            self._num_saved_outputs[seq.request_id] = seq.num_output_tokens
            saved = self._saved_state.get(seq.request_id)
            if saved is None or not self._same_state(saved, seq):
                self._saved_state[seq.request_id] = self._state_of(seq)

    @staticmethod
    def _state_of(seq: Sequence) -> tuple:
        return (seq.status, list(seq.block_table), seq.num_tokens - seq.num_computed_tokens, seq.num_cached_tokens)

    @staticmethod
    def _same_state(saved: tuple, seq: Sequence) -> bool:
        # Compared field by field, cheapest first: at batch 256 this runs 256 times a step.
        status, block_table, num_uncomputed, num_cached = saved
        return (status is seq.status and num_uncomputed == seq.num_tokens - seq.num_computed_tokens
                and num_cached == seq.num_cached_tokens and block_table == seq.block_table)

    @staticmethod
    def _state_fields(seq: Sequence) -> dict:
        return {
            "status": seq.status.value,
            "block_table": json.dumps(seq.block_table),
            "num_uncomputed_tokens": seq.num_tokens - seq.num_computed_tokens,
            "num_cached_tokens": seq.num_cached_tokens,
        }

    @staticmethod
    def _to_sequence(fields: dict, outputs: list, logprobs: list = ()) -> Sequence | None:
        if not fields:
            return None
        fields = {_str(k): _str(v) for k, v in fields.items()}
        prompt_token_ids = json.loads(fields["prompt_token_ids"])
        if "num_uncomputed_tokens" in fields:
            num_computed = len(prompt_token_ids) + len(outputs) - int(fields["num_uncomputed_tokens"])
        else:  # written before num_uncomputed_tokens
            num_computed = int(fields["num_computed_tokens"])
        return Sequence.from_record(
            {
                "request_id": fields["request_id"],
                "prompt_token_ids": prompt_token_ids,
                "output_token_ids": [int(_str(t)) for t in outputs],
                "sampling_params": json.loads(fields["sampling_params"]),
                "status": fields["status"],
                "block_table": json.loads(fields["block_table"]),
                "num_computed_tokens": num_computed,
                "arrival_time": float(fields["arrival_time"]),
                "priority": int(fields.get("priority", 0)),
                "group_id": fields.get("group_id", ""),
                "index": int(fields.get("index", 0)),
                "num_cached_tokens": int(fields.get("num_cached_tokens", 0)),
                "output_logprobs": [json.loads(_str(lp)) for lp in logprobs],
            }
        )
