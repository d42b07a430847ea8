"""SamplingParams as plain Python, shared by the scheduler and the runner.

Protobuf stays at the service edge; this dataclass is what the code in between
passes around. It validates itself so every entry point rejects the same
inputs with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmexec.errors import InvalidArgumentError

DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidArgumentError(
                f"sampling_params.temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"sampling_params.top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"sampling_params.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens <= 0:
            raise InvalidArgumentError(f"sampling_params.max_tokens must be > 0, got {self.max_tokens}")
        if any(s == "" for s in self.stop):
            raise InvalidArgumentError("sampling_params.stop must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        return cls(
            temperature=float(data.get("temperature", 1.0)),
            top_p=float(data.get("top_p", 1.0)),
            top_k=int(data.get("top_k", 0)),
            max_tokens=int(data.get("max_tokens", DEFAULT_MAX_TOKENS)),
            seed=None if data.get("seed") is None else int(data["seed"]),
            stop=tuple(data.get("stop", ())),
            stop_token_ids=tuple(int(t) for t in data.get("stop_token_ids", ())),
            ignore_eos=bool(data.get("ignore_eos", False)),
        )
