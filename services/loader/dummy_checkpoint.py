"""`dummy`: random weights of the right names, shapes and dtypes, from a config.json alone.

Benchmarks and capacity tests need a model of a given shape, not its trained
values, and no multi-GB download. Values are reproducible (each tensor's
generator is seeded from its name) and tame enough that a forward pass stays
finite: matrices ~ N(0, initializer_range), norm weights 1, biases 0.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import torch

from llmexec.errors import CheckpointError
from llmexec.loader.checkpoint import Checkpoint, TensorSpec
from llmexec.loader.config_tensors import config_tensor_specs
from llmexec.loader.hf_folder import read_json, tokenizer_files


class DummyCheckpoint(Checkpoint):
    load_format = "dummy"

    def __init__(self, source: str):
        if os.path.isfile(source):
            if os.path.basename(source) != "config.json" and not source.endswith(".json"):
                raise CheckpointError(f"{source}: the dummy format needs a config.json or the folder holding one")
            folder, config_path = os.path.dirname(source), source
        else:
            folder, config_path = source, os.path.join(source, "config.json")
        super().__init__(folder)
        self._config_path = config_path
        self.config = read_json(config_path, what="config.json")
        self._specs: list[TensorSpec] | None = None

    def _config_name(self) -> str:
        return self._config_path

    def _read_specs(self) -> list[TensorSpec]:
        if self._specs is None:
            self._specs = config_tensor_specs(self.config)
        return self._specs

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        std = float(self.config.get("initializer_range", 0.02))
        for spec in self._read_specs():
            yield spec.name, dummy_tensor(spec, std, self.device)

    def tokenizer_files(self) -> dict[str, bytes]:
        return tokenizer_files(self.source)


def dummy_tensor(spec: TensorSpec, std: float, device: str = "cpu") -> torch.Tensor:
    """A reproducible random tensor for `spec` (same name and device, same values), made on
    `device` (a GPU generates an 8B model in about a second; the host would take minutes)."""
    leaf = spec.name.rsplit(".", 1)[-1]
    if leaf == "bias" or not spec.dtype.is_floating_point:
        return torch.zeros(spec.shape, dtype=spec.dtype, device=device)
    if len(spec.shape) == 1:  # norm scales: 1 keeps activations the size they were
        return torch.ones(spec.shape, dtype=spec.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(spec.name.encode()))
    values = torch.randn(spec.shape, generator=generator, dtype=torch.float32, device=device)
    return values.mul_(std).to(spec.dtype)
