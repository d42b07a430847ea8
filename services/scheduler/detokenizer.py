"""Token ids to streamed text, one step at a time, with stop strings.

Decoding the whole output after every token costs O(n) per token. Instead, as
vLLM and TGI do, only a window is decoded: tokens [prefix_offset, read_offset)
were already turned into text, tokens from read_offset on are new. The text
of the new tokens is decode(window)[len(decode(prefix)):]; the prefix gives
the tokenizer its context (a SentencePiece "▁word" decodes to " word" only
after another token). When the window's text ends in "\ufffd", a byte-level
token stopped inside a multi-byte UTF-8 character: the text waits for the
token(s) that complete it.

Stop strings: the output text is searched for each stop string; the text up
to the first one is returned and the detokenizer stops. Trailing characters
that may be the start of a stop string are held back until the next tokens
tell whether they are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context for the first output tokens.
INITIAL_PREFIX_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        special_token_ids: Collection[int] = (),
        stop: tuple[str, ...] = (),
    ):
        """decode: token ids -> text, e.g. a tokenizer's decode that keeps special
        tokens; with skip_special_tokens, special_token_ids never reach it."""
        self.decode = decode
        self.skipped_ids = frozenset(special_token_ids) if skip_special_tokens else frozenset()
        self.stop = tuple(stop)
        # Only the tail of the prompt matters as context.
        self.token_ids = [t for t in prompt_token_ids if t not in self.skipped_ids][-INITIAL_PREFIX_TOKENS:]
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.pending = ""  # decoded text not returned yet (held back for stop strings)
        self.stopped = False
        self.stop_string: str | None = None

    def add(self, token_ids: list[int], allow_stop: bool = True) -> str:
        """Take newly generated token ids; return the text they complete, '' if none yet.

        allow_stop=False (a sequence still under its min_tokens) returns the text
        without looking for stop strings."""
        if self.stopped:
            return ""
        self.token_ids.extend(t for t in token_ids if t not in self.skipped_ids)
        return self._emit(self._read(final=False), final=False, allow_stop=allow_stop)

    def flush(self) -> str:
        """At the end of generation: the text held back, incomplete characters included."""
        if self.stopped:
            return ""
        return self._emit(self._read(final=True), final=True)

    def _read(self, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self.decode(self.token_ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.token_ids[self.prefix_offset :])
        if len(text) <= len(prefix_text) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        # Slide the window: the new tokens become the next prefix.
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return text[len(prefix_text) :]

    def _emit(self, new_text: str, final: bool, allow_stop: bool = True) -> str:
        text = self.pending + new_text
        if not self.stop or not allow_stop:
            self.pending = ""
            return text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.stop_string = next(s for s in self.stop if text.find(s) == cut)
            self.pending = ""
            return text[:cut]
        held = 0 if final else self._partial_stop_len(text)
        self.pending = text[len(text) - held :]
        return text[: len(text) - held]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
