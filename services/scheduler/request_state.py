"""What the engine keeps per client request while it streams: its completions'
text so far and the queues of the clients reading it.

Each generated token's text (from the incremental detokenizer, stop strings
applied) is kept next to the token, so a client resuming at token N gets
exactly the text a client streaming from the start got from token N on. After
a restart the texts are rebuilt by replaying the stored tokens through a new
detokenizer, which is deterministic.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from llmexec.scheduler.detokenizer import IncrementalDetokenizer
from llmexec.scheduler.sequence import Sequence
from llmexec.scheduler.tokenizer import Tokenizer
from llmexec.step import TokenLogprobs

END = None  # put on a subscriber's queue after the request's last chunk


@dataclass
class StreamChunk:
    """What one GenerateResponse carries."""

    index: int = 0  # which completion
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort" on a completion's last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def followed_by(self, later: StreamChunk) -> StreamChunk:
        """One chunk holding this one and a later one of the same completion (a new
        object: a chunk may sit on several subscribers' queues)."""
        merged = replace(self, token_ids=list(self.token_ids), logprobs=list(self.logprobs))
        merged.absorb(later)
        return merged

    def absorb(self, later: StreamChunk) -> None:
        """Append a later chunk of the same completion in place (only for a chunk no
        subscriber holds yet); its finish fields, if any, win."""
        self.token_ids.extend(later.token_ids)
        self.text += later.text
        self.logprobs.extend(later.logprobs)
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
            self.prompt_tokens, self.completion_tokens = later.prompt_tokens, later.completion_tokens
            self.cached_prompt_tokens = later.cached_prompt_tokens


@dataclass(eq=False)
class Completion:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    texts: list[str] = field(default_factory=list)  # per output token
    last_token_time: float | None = None  # in this process; None before its first token here
    num_delivered: int = 0  # output tokens stored and handed to the subscribers
    held: StreamChunk | None = None  # stored, not yet handed: fewer than stream_interval tokens

    def release(self, chunk: StreamChunk, stream_interval: int) -> StreamChunk | None:
        """The chunk to hand to the subscribers now: this one merged into what was held,
        once stream_interval tokens have gathered or the completion finished; else None."""
        if self.held is not None:  # made by the engine for this completion alone: merged in place
            self.held.absorb(chunk)
            chunk, self.held = self.held, None
        if len(chunk.token_ids) < stream_interval and chunk.finish_reason is None:
            self.held = chunk
            return None
        return chunk

    @classmethod
    def start(cls, seq: Sequence, tokenizer: Tokenizer | None) -> Completion:
        """For seq as it is; its stored output tokens, if any, are replayed through the detokenizer."""
        detok = None
        if tokenizer is not None:
            detok = IncrementalDetokenizer(tokenizer.decode, seq.prompt_token_ids, stop=tuple(seq.sampling_params.stop))
        completion = cls(seq, detok)
        for k, token_id in enumerate(seq.output_token_ids, start=1):
            last = k == seq.num_output_tokens and seq.is_finished
            completion.texts.append(completion.text_of(token_id, k, final=last))
        completion.num_delivered = seq.num_output_tokens  # stored ones: whoever resumes may have them
        return completion

    def text_of(self, token_id: int, num_outputs: int, final: bool) -> str:
        """The text that output token number num_outputs (1-based) completes; `final`
        when it is the completion's last. Sets detokenizer.stopped on a stop string."""
        if self.detokenizer is None:
            return ""
        detok = self.detokenizer
        text = detok.add([token_id], allow_stop=num_outputs > self.seq.sampling_params.min_tokens)
        if final and not detok.stopped:
            text += detok.flush()
        return text

    def chunk_from(self, offset: int) -> StreamChunk:
        """Everything delivered from output token `offset` on, as one chunk (what is
        not delivered yet reaches the subscribers with the step that made it)."""
        seq, end = self.seq, self.num_delivered
        chunk = StreamChunk(
            index=seq.index,
            token_ids=seq.output_token_ids[offset:end],
            text="".join(self.texts[offset:end]),
            logprobs=seq.output_logprobs[offset:end],
        )
        if seq.is_finished and end == seq.num_output_tokens:
            self.finish(chunk)
        return chunk

    def finish(self, chunk: StreamChunk) -> None:
        seq = self.seq
        chunk.finish_reason = seq.finish_reason
        chunk.prompt_tokens = seq.num_prompt_tokens
        chunk.completion_tokens = seq.num_output_tokens
        chunk.cached_prompt_tokens = seq.num_cached_tokens


@dataclass(eq=False)
class RequestStream:
    group_id: str
    completions: list[Completion]
    replica: object  # the Replica whose scheduler holds the unfinished completions
    subscribers: list[asyncio.Queue] = field(default_factory=list)
    stream_interval: int = 1  # tokens per chunk handed to the subscribers (GenerateRequest.stream_interval)

    @property
    def finished(self) -> bool:
        return all(c.seq.is_finished for c in self.completions)

    def publish(self, item) -> None:
        for queue in self.subscribers:
            queue.put_nowait(item)
