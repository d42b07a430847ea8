"""SamplingParams as plain Python, shared by the scheduler and the runner.

Protobuf stays at the service edge; this dataclass is what the code in between
passes around. It validates itself so every entry point rejects the same
inputs with the same messages. The meanings follow vLLM's SamplingParams.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace

from llmexec.errors import InvalidArgumentError

DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20  # top-n alternatives a caller may ask for per token
MAX_N = 64  # completions per request


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0  # EOS and stop_token_ids are masked, stop strings ignored, until this many
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # Penalties on tokens already seen: repetition (prompt and output; > 1 discourages),
    # presence and frequency (output only; > 0 discourages).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: plus the top k
    n: int = 1  # completions of the same prompt

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidArgumentError(
                f"sampling_params.temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"sampling_params.top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"sampling_params.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgumentError(f"sampling_params.min_p must lie in [0, 1], got {self.min_p}")
        if self.max_tokens <= 0:
            raise InvalidArgumentError(f"sampling_params.max_tokens must be > 0, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgumentError(
                f"sampling_params.min_tokens must lie in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if any(s == "" for s in self.stop):
            raise InvalidArgumentError("sampling_params.stop must not contain an empty string")
        if not self.repetition_penalty > 0.0:
            raise InvalidArgumentError(
                f"sampling_params.repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidArgumentError(f"sampling_params.{name} must lie in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgumentError(f"sampling_params.logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not 1 <= self.n <= MAX_N:
            raise InvalidArgumentError(f"sampling_params.n must lie in [1, {MAX_N}], got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_token_history(self) -> bool:
        """Whether sampling looks at the tokens seen so far (the penalties do)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def for_completion(self, index: int) -> SamplingParams:
        """The params of completion `index` of n: a seed of its own, so the n
        completions differ yet each stays reproducible."""
        if index == 0 or self.seed is None:
            return self
        digest = hashlib.blake2b(f"{self.seed}/{index}".encode(), digest_size=8).digest()
        return replace(self, seed=int.from_bytes(digest, "little") >> 1)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["stop"] = list(self.stop)
        data["stop_token_ids"] = list(self.stop_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SamplingParams:
        defaults = cls()
        get = lambda name: data.get(name, getattr(defaults, name))
        return cls(
            temperature=float(get("temperature")),
            top_p=float(get("top_p")),
            top_k=int(get("top_k")),
            min_p=float(get("min_p")),
            max_tokens=int(get("max_tokens")),
            min_tokens=int(get("min_tokens")),
            seed=None if data.get("seed") is None else int(data["seed"]),
            stop=tuple(data.get("stop", ())),
            stop_token_ids=tuple(int(t) for t in data.get("stop_token_ids", ())),
            ignore_eos=bool(get("ignore_eos")),
            repetition_penalty=float(get("repetition_penalty")),
            presence_penalty=float(get("presence_penalty")),
            frequency_penalty=float(get("frequency_penalty")),
            logprobs=None if data.get("logprobs") is None else int(data["logprobs"]),
            n=int(get("n")),
        )
