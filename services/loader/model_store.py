"""The loader's models, keyed by id: checkpoint metadata plus shared weights."""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from llmexec.errors import InvalidArgumentError, NotFoundError
from llmexec.loader.checkpoint import Checkpoint, open_checkpoint
from llmexec.loader.shm_store import SharedWeights
from llmexec.models.registry import model_class_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model_id: str
    checkpoint: Checkpoint
    weights: SharedWeights
    tokenizer_files: dict[str, bytes]

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    @property
    def max_model_len(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True)


def model_id_for(source: str) -> str:
    """A readable id from the checkpoint's file or folder name."""
    name = Path(source).name
    name = re.sub(r"\.gguf$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]", "-", name) or "model"


class ModelStore:
    """Loads checkpoints once each and keeps them until close()."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._by_source: dict[tuple[str, str, str], str] = {}
        self._default_id: str | None = None
        self._lock = threading.Lock()

    def load(self, source: str, load_format: str = "auto", dtype: str = "float32") -> LoadedModel:
        """Load a checkpoint into shared memory (blocking; call it off the event loop)."""
        dtype = dtype or "float32"
        load_format = load_format or "auto"
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        source = str(Path(source).expanduser().resolve()) if source else source
        if not source:
            raise InvalidArgumentError("model must name a Hugging Face folder or a .gguf file")
        key = (source, load_format, dtype)
        with self._lock:
            if key in self._by_source:
                return self._models[self._by_source[key]]
            checkpoint = open_checkpoint(source, load_format)
            model_class_for(checkpoint.architecture, checkpoint.config)  # fail early, listing the supported names
            model_id = self._unique_id(model_id_for(source))
            log.info("loading %s (%s, %s) as %s", source, checkpoint.load_format, dtype, model_id)
            weights = SharedWeights.create(model_id, checkpoint, DTYPES[dtype])
            try:
                tokenizer_files = checkpoint.tokenizer_files()
            except Exception:
                weights.close()
                raise
            model = LoadedModel(model_id, checkpoint, weights, tokenizer_files)
            self._models[model_id] = model
            self._by_source[key] = model_id
            self._default_id = self._default_id or model_id
            log.info(
                "loaded %s: %d parameters, %s", model_id, weights.parameter_count, weights.bytes_by_dtype
            )
            return model

    def get(self, model_id: str = "") -> LoadedModel:
        if not model_id:
            if self._default_id is None:
                raise NotFoundError("no model is loaded yet; call LoaderService/LoadModel first")
            model_id = self._default_id
        try:
            return self._models[model_id]
        except KeyError:
            raise NotFoundError(
                f"model {model_id!r} is not loaded; loaded models: {sorted(self._models) or 'none'}"
            ) from None

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                model.weights.close()
            self._models.clear()
            self._by_source.clear()

    def _unique_id(self, base: str) -> str:
        candidate, n = base, 1
        while candidate in self._models:
            n += 1
            candidate = f"{base}-{n}"
        return candidate
