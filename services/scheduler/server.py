"""SchedulerService: validate and tokenize requests, stream the engine's output."""

from __future__ import annotations

import time
import uuid

from llmexec.errors import InvalidArgumentError
from llmexec.rpc.codec import sampling_from_pb
from llmexec.scheduler.engine import Engine
from llmexec.scheduler.sequence import Sequence
from llmexec.v1 import scheduler_pb2, scheduler_pb2_grpc

FINISH_REASONS = {
    "stop": scheduler_pb2.FINISH_REASON_STOP,
    "length": scheduler_pb2.FINISH_REASON_LENGTH,
    "abort": scheduler_pb2.FINISH_REASON_CANCELLED,
}


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

    async def Generate(self, request, context):
        params = sampling_from_pb(request.sampling_params)
        seq = Sequence(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_token_ids=self.prompt_token_ids(request),
            sampling_params=params,
            arrival_time=time.time(),
        )
        outputs = self.engine.add(seq)
        finished = False
        first = True
        try:
            while not finished:
                chunk = await outputs.get()
                if isinstance(chunk, Exception):
                    raise chunk
                finished = chunk.finish_reason is not None
                yield scheduler_pb2.GenerateResponse(
                    request_id=seq.request_id if first else "",
                    token_ids=chunk.token_ids,
                    text=chunk.text,
                    finish_reason=FINISH_REASONS.get(chunk.finish_reason or "", 0),
                    prompt_tokens=chunk.prompt_tokens,
                    completion_tokens=chunk.completion_tokens,
                )
                first = False
        finally:
            # Reached on cancellation, disconnect or deadline too: free the blocks.
            if not finished:
                self.engine.abort(seq.request_id)

    async def GetServerInfo(self, request, context):
        sched = self.engine.scheduler
        return scheduler_pb2.GetServerInfoResponse(
            model_id=self.model_id,
            architecture=self.architecture,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            block_size=sched.block_manager.block_size,
            num_blocks=sched.block_manager.num_blocks,
            free_blocks=sched.block_manager.num_free_blocks,
            running_requests=sched.num_running,
            waiting_requests=sched.num_waiting,
            has_tokenizer=self.engine.tokenizer is not None,
        )
