"""Hugging Face folders with PyTorch weights: pytorch_model.bin, or shards listed in its index.

A .bin file is a pickle. It is read only with `torch.load(weights_only=True)`,
whose unpickler accepts tensors and plain containers and refuses anything
else, so a malicious checkpoint cannot run code. Files in torch's zip format
are memory-mapped: a shard's tensors are read from the page cache as they are
copied away, and its pages are dropped when the next shard is opened.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator

import torch

from llmexec.errors import CheckpointError
from llmexec.loader.checkpoint import Checkpoint, TensorSpec
from llmexec.loader.hf_folder import find_shards, open_folder, tokenizer_files

SINGLE_FILE = "pytorch_model.bin"
INDEX_FILE = "pytorch_model.bin.index.json"


class TorchBinCheckpoint(Checkpoint):
    load_format = "pt"

    def __init__(self, source: str):
        super().__init__(source)
        self.config = open_folder(source, "the .bin files")
        # shard file name -> HF names the index places in it ([] = every tensor in the file).
        shards = find_shards(source, SINGLE_FILE, INDEX_FILE)
        if shards is None:
            raise CheckpointError(f"{source} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._shards = shards

    def _shard_tensors(self, shard: str, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        path = os.path.join(self.source, shard)
        state_dict = load_state_dict(path)
        try:
            for name in names or list(state_dict):
                if name not in state_dict:
                    raise CheckpointError(f"{INDEX_FILE} places tensor {name} in {path}, but that file lacks it")
                yield name, state_dict[name]
        finally:
            # Drop the mapping before the next shard's, so at most one is resident.
            del state_dict

    def _read_specs(self) -> list[TensorSpec]:
        # Mapped, so listing reads the pickles, not the tensor data.
        return [
            TensorSpec(
                name, tuple(tensor.shape), tensor.dtype, str(tensor.dtype).removeprefix("torch."),
                os.path.join(self.source, shard),
            )
            for shard, names in self._shards.items()
            for name, tensor in self._shard_tensors(shard, names)
        ]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard, names in self._shards.items():
            yield from self._shard_tensors(shard, names)

    def tokenizer_files(self) -> dict[str, bytes]:
        return tokenizer_files(self.source)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read one .bin file safely: name -> tensor, memory-mapped when the file allows it.

    Raises CheckpointError naming the file when it is truncated or corrupt,
    holds anything but tensors, or is not a dict of tensors.
    """
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Files from torch < 1.6 (not zip archives) cannot be mapped; read them whole.
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors, and arbitrary pickles are never unpickled here "
            f"(torch.load weights_only=True refused: {str(error).splitlines()[0]}); convert it to safetensors"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"{path} could not be read; it is truncated or corrupt: {error}") from error
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, not a dict of tensors")
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
    return state_dict
