"""SchedulerService: validate and tokenize requests, stream the engine's output."""

from __future__ import annotations

import asyncio
import time
import uuid

from llmexec.errors import InvalidArgumentError
from llmexec.rpc.codec import logprobs_to_pb, sampling_from_pb
from llmexec.scheduler.engine import Engine
from llmexec.scheduler.request_state import END, StreamChunk
from llmexec.scheduler.sequence import COMPLETION_SEPARATOR, Sequence, completion_id
from llmexec.v1 import scheduler_pb2, scheduler_pb2_grpc

FINISH_REASONS = {
    "stop": scheduler_pb2.FINISH_REASON_STOP,
    "length": scheduler_pb2.FINISH_REASON_LENGTH,
    "abort": scheduler_pb2.FINISH_REASON_CANCELLED,
}


def chunk_to_pb(chunk: StreamChunk, request_id: str = "") -> scheduler_pb2.GenerateResponse:
    return scheduler_pb2.GenerateResponse(
        request_id=request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finish_reason=FINISH_REASONS.get(chunk.finish_reason or "", 0),
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        index=chunk.index,
        logprobs=[logprobs_to_pb(lp) for lp in chunk.logprobs],
        cached_prompt_tokens=chunk.cached_prompt_tokens,
    )


async def next_items(queue: asyncio.Queue):
    """The queue's StreamChunks until END; an exception put on it is raised.

    Chunks that queued up while the previous one was being written (a client
    reading slower than tokens arrive) go out merged, one per completion: a
    slow reader costs the server fewer writes, not more."""
    while True:
        item = await queue.get()
        merged: list[StreamChunk] = []
        while True:
            if item is END or isinstance(item, Exception):
                for chunk in merged:
                    yield chunk
                if item is END:
                    return
                raise item
            if merged and merged[-1].index == item.index and merged[-1].finish_reason is None:
                merged[-1] = merged[-1].followed_by(item)
            else:
                merged.append(item)
            if queue.empty():
                break
            item = queue.get_nowait()
        for chunk in merged:
            yield chunk


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, engine: Engine, model_id: str, architecture: str, max_model_len: int, vocab_size: int):
        self.engine = engine
        self.model_id = model_id
        self.architecture = architecture
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def prompt_token_ids(self, request: scheduler_pb2.GenerateRequest) -> list[int]:
        """Exactly one of prompt, prompt_token_ids, messages -> validated token ids."""
        given = [name for name in ("prompt", "prompt_token_ids", "messages") if getattr(request, name)]
        if not given:
            raise InvalidArgumentError("the prompt is empty: set prompt, prompt_token_ids or messages")
        if len(given) > 1:
            raise InvalidArgumentError(f"set only one of prompt, prompt_token_ids, messages (got {', '.join(given)})")
        tokenizer = self.engine.tokenizer
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgumentError(
                    f"prompt_token_ids contains {bad[:5]}, outside the vocabulary [0, {self.vocab_size})"
                )
        elif tokenizer is None:
            raise InvalidArgumentError("this model has no tokenizer; send prompt_token_ids instead of text")
        elif request.prompt:
            ids = tokenizer.encode(request.prompt)
        else:
            ids = tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in request.messages])
        if not ids:
            raise InvalidArgumentError("the prompt tokenized to zero tokens")
        if len(ids) >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {len(ids)} tokens but the model's context holds {self.max_model_len} "
                f"(prompt plus at least one new token); shorten the prompt"
            )
        return ids

    def sequences(self, request: scheduler_pb2.GenerateRequest) -> list[Sequence]:
        """The request's n completions as sequences sharing its prompt."""
        params = sampling_from_pb(request.sampling_params)
        group_id = request.request_id or uuid.uuid4().hex
        if COMPLETION_SEPARATOR in group_id:
            raise InvalidArgumentError(f"request_id may not contain {COMPLETION_SEPARATOR!r}")
        prompt = self.prompt_token_ids(request)
        arrival = time.time()
        return [
            Sequence(
                request_id=completion_id(group_id, i, params.n),
                prompt_token_ids=list(prompt),
                sampling_params=params.for_completion(i),
                arrival_time=arrival,
                priority=request.priority,
                group_id=group_id,
                index=i,
            )
            for i in range(params.n)
        ]

    async def Generate(self, request, context):
        if request.stream_interval < 0:
            raise InvalidArgumentError(f"stream_interval must be >= 0 (0 or 1: every token), got {request.stream_interval}")
        seqs = self.sequences(request)
        group_id = seqs[0].group_id
        outputs = self.engine.add(seqs, request.stream_interval)
        finished = False
        first = True
        try:
            async for chunk in next_items(outputs):
                yield chunk_to_pb(chunk, group_id if first else "")
                first = False
            finished = True
        finally:
            # Reached on cancellation, disconnect or deadline too: free the blocks.
            if not finished:
                self.engine.abort(group_id)

    async def ResumeGenerate(self, request, context):
        if not request.request_id:
            raise InvalidArgumentError("request_id is required")
        backlog, queue = self.engine.resume(request.request_id, request.offset)
        try:
            for chunk in backlog:
                yield _as_resume(chunk_to_pb(chunk, request.request_id))
            if queue is not None:
                async for chunk in next_items(queue):
                    yield _as_resume(chunk_to_pb(chunk, request.request_id))
        finally:
            # A resumed stream that goes away leaves the request running: another may resume it.
            if queue is not None:
                self.engine.unsubscribe(request.request_id, queue)

    async def GetServerInfo(self, request, context):
        runners = self.engine.snapshot()["runners"]
        first = self.engine.replicas[0].block_manager
        return scheduler_pb2.GetServerInfoResponse(
            model_id=self.model_id,
            architecture=self.architecture,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            block_size=first.block_size,
            num_blocks=sum(r["num_blocks"] for r in runners),
            free_blocks=sum(r["free_blocks"] for r in runners),
            running_requests=self.engine.num_running,
            waiting_requests=self.engine.num_waiting,
            has_tokenizer=self.engine.tokenizer is not None,
            runners=[
                scheduler_pb2.RunnerStatus(
                    address=r["address"],
                    healthy=bool(r["healthy"]),
                    num_blocks=r["num_blocks"],
                    free_blocks=r["free_blocks"],
                    running_requests=r["running"],
                    waiting_requests=r["waiting"],
                    routed_sequences=r["routed"],
                    prefix_cache_hit_tokens=r["hits"],
                    prefix_cache_query_tokens=r["queries"],
                )
                for r in runners
            ],
            metrics_port=self.engine.metrics.port,
        )


def _as_resume(reply: scheduler_pb2.GenerateResponse) -> scheduler_pb2.ResumeGenerateResponse:
    # The two messages share field names and numbers: the bytes of one parse as the other.
    return scheduler_pb2.ResumeGenerateResponse.FromString(reply.SerializeToString())
