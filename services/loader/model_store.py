"""The loader's models, keyed by id: checkpoint metadata plus shared weights."""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmexec.errors import InvalidArgumentError, NotFoundError
from llmexec.loader.binding_check import check_model_accepts
from llmexec.loader.checkpoint import Checkpoint, open_checkpoint
from llmexec.loader.hf_cache import resolve_model_path
from llmexec.loader.quantized_checkpoint import quantize_checkpoint
from llmexec.loader.shm_store import SharedWeights, plan_layout
from llmexec.loader.tp_plan import rank_plans
from llmexec.loader.weight_plan import plan_weights
from llmexec.models.config_keys import standard_config
from llmexec.models.registry import model_class_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model_id: str
    checkpoint: Checkpoint
    weights: SharedWeights
    tokenizer_files: dict[str, bytes]
    quantization: str = "none"  # llmexec.loader.quantized_checkpoint.QUANTIZATIONS
    parameter_count: int = 0  # the model's, whatever form the weights are stored in
    # New for every load: runners compare it to the one they attached to (ModelInfo.generation).
    generation: str = field(default_factory=lambda: uuid.uuid4().hex)
    device: str = "cpu"  # where the weights live: "cpu" (shared memory) or "cuda:N"
    # Tensor parallelism: one shared-memory file per rank, rank r's shard at index r (weights is
    # rank 0's); empty when the model is not split.
    rank_weights: list[SharedWeights] = field(default_factory=list)

    @property
    def tensor_parallel_size(self) -> int:
        return max(1, len(self.rank_weights))

    def weights_of_rank(self, rank: int) -> SharedWeights:
        """Rank `rank`'s shard (the whole model when not split). Raises InvalidArgumentError."""
        if not 0 <= rank < self.tensor_parallel_size:
            raise InvalidArgumentError(
                f"tensor parallel rank {rank} is out of range: {self.model_id} is split over "
                f"{self.tensor_parallel_size} rank(s)"
            )
        return self.rank_weights[rank] if self.rank_weights else self.weights

    def close(self) -> None:
        for weights in self.rank_weights or [self.weights]:
            weights.close()

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    @property
    def max_model_len(self) -> int:
        # GPT-2 says n_positions; BLOOM (ALiBi) sets no limit, so it gets the default.
        return int(standard_config(self.config).get("max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True)


def model_id_for(source: str) -> str:
    """A readable id from the checkpoint's file or folder name."""
    path = Path(source)
    name = (path.parent if path.suffix == ".json" else path).name  # a config.json alone (dummy): its folder
    name = re.sub(r"\.gguf$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]", "-", name) or "model"


class ModelStore:
    """Loads checkpoints once each and keeps them until close().

    device "cpu" keeps weights in /dev/shm (shm_store); "cuda" or "cuda:N" in one GPU
    allocation per model, exported over CUDA IPC (device_store), bfloat16 unless told.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = _resolve_device(device)
        self._models: dict[str, LoadedModel] = {}
        self._by_source: dict[tuple[str, str, str], str] = {}
        self._default_id: str | None = None
        self._lock = threading.Lock()

    def load(self, source: str, load_format: str = "auto", dtype: str = "float32", quantization: str = "",
             quantization_group_size: int = 0, tensor_parallel_size: int = 1) -> LoadedModel:
        """Load a checkpoint into shared memory (blocking; call it off the event loop).

        `quantization` and `quantization_group_size` as in quantize_checkpoint.
        `tensor_parallel_size` > 1 keeps one shard per rank, each in its own file
        (llmexec.loader.tp_plan); a model that does not split by it is refused.
        """
        tensor_parallel_size = tensor_parallel_size or 1
        if tensor_parallel_size > 1 and self.device != "cpu":
            raise InvalidArgumentError("tensor-parallel shards are kept in shared memory: run the loader on the CPU "
                                       "(each rank's runner copies its shard to its own GPU)")
        dtype = dtype or ("float32" if self.device == "cpu" else "bfloat16")
        load_format = load_format or "auto"
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not source:
            raise InvalidArgumentError("model must name a Hugging Face folder, a .gguf file or a cached model id")
        requested, source = source, resolve_model_path(source)  # a model id becomes its HF cache snapshot
        key = (source, load_format, dtype, quantization, quantization_group_size, tensor_parallel_size)
        with self._lock:
            if key in self._by_source:
                return self._models[self._by_source[key]]
            checkpoint = open_checkpoint(source, load_format)
            checkpoint.device = self.device
            # Fails early, listing the supported names; the class says what it fuses.
            model_class = model_class_for(checkpoint.architecture, checkpoint.config)
            checkpoint, quantization = quantize_checkpoint(
                checkpoint, quantization, quantization_group_size, model_class, standard_config(checkpoint.config),
                DTYPES[dtype],
            )
            # A quantized checkpoint yields its floating tensors already cast (and its codes must stay as they are).
            store_dtype = DTYPES[dtype] if quantization == "none" else None
            plan = plan_weights(model_class, checkpoint.config, checkpoint.tensor_specs(), checkpoint.source)
            # A missing or misshapen tensor fails here, naming the checkpoint, not in a runner later.
            parameter_count = check_model_accepts(
                model_class, standard_config(checkpoint.config), plan_layout(plan, store_dtype)[0], checkpoint.source
            )
            model_id = self._unique_id(model_id_for(requested))
            log.info("loading %s (%s, %s, quantization %s) as %s", source, checkpoint.load_format, dtype, quantization,
                     model_id)
            rank_weights = []
            if tensor_parallel_size > 1:
                config = standard_config(checkpoint.config)
                plans = rank_plans(model_class, config, plan, tensor_parallel_size, store_dtype, checkpoint.source)
                rank_weights = SharedWeights.create_ranks(model_id, checkpoint, store_dtype, plans)
                weights = rank_weights[0]
            elif self.device == "cpu":
                weights = SharedWeights.create(model_id, checkpoint, store_dtype, plan=plan)
            else:
                from llmexec.loader.device_store import DeviceWeights

                weights = DeviceWeights.create_on_device(checkpoint, self.device, store_dtype, plan=plan)
            try:
                tokenizer_files = checkpoint.tokenizer_files()
            except Exception:
                for shard in rank_weights or [weights]:
                    shard.close()
                raise
            model = LoadedModel(model_id, checkpoint, weights, tokenizer_files, quantization, parameter_count,
                                device=self.device, rank_weights=rank_weights)
            self._models[model_id] = model
            self._by_source[key] = model_id
            self._default_id = self._default_id or model_id
            log.info(
                "loaded %s: %d parameters, %s", model_id, parameter_count, weights.bytes_by_dtype
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
                model.close()
            self._models.clear()
            self._by_source.clear()

    def _unique_id(self, base: str) -> str:
        candidate, n = base, 1
        while candidate in self._models:
            n += 1
            candidate = f"{base}-{n}"
        return candidate


def _resolve_device(device: str) -> str:
    """"cpu", or "cuda:N" with N the current device when not given; fails early without CUDA."""
    device = (device or "cpu").lower()
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise InvalidArgumentError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} was asked for, but this machine has no CUDA device")
    parsed = torch.device(device)
    return f"cuda:{parsed.index if parsed.index is not None else torch.cuda.current_device()}"
