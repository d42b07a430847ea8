"""The scheduler's tokenizer, rebuilt from the files the loader sends.

Prompts are tokenized exactly as `AutoTokenizer.from_pretrained(model)(prompt)`
would: the loader ships the files `save_pretrained` wrote, and we load them
with the same class.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmexec.errors import FailedPreconditionError, InvalidArgumentError


class Tokenizer:
    def __init__(self, files: dict[str, bytes]) -> None:
        from transformers import AutoTokenizer  # heavy import; only processes that tokenize pay it

        with tempfile.TemporaryDirectory(prefix="llmexec-tokenizer-") as folder:
            for name, content in files.items():
                (Path(folder) / Path(name).name).write_bytes(content)
            self._tok = AutoTokenizer.from_pretrained(folder)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render the chat template with a generation prompt, then tokenize as HF does."""
        if not getattr(self._tok, "chat_template", None):
            raise FailedPreconditionError("this model's tokenizer has no chat template; send a plain prompt")
        for m in messages:
            if not m["role"]:
                raise InvalidArgumentError("every chat message needs a role (system, user or assistant)")
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id
