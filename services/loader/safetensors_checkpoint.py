"""Hugging Face folders: config.json plus one or more safetensors shards."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

from llmexec.errors import CheckpointError
from llmexec.loader.checkpoint import Checkpoint, TensorSpec
from llmexec.loader.hf_folder import find_shards, open_folder, tokenizer_files

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype -> torch dtype.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsCheckpoint(Checkpoint):
    load_format = "safetensors"

    def __init__(self, source: str):
        super().__init__(source)
        self.config = open_folder(source, "the .safetensors files")
        # shard file name -> HF names it holds, in file order.
        shards = find_shards(source, SINGLE_FILE, INDEX_FILE)
        if shards is None:
            found = ", ".join(sorted(os.listdir(source))) or "nothing"
            raise CheckpointError(
                f"{source} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}); "
                "only safetensors weights are supported"
            )
        self._shards = shards

    def _read_specs(self) -> list[TensorSpec]:
        specs = []
        for shard, names in self._shards.items():
            path = os.path.join(self.source, shard)
            header = read_header(path)
            for name in names or header:
                if name not in header:
                    raise CheckpointError(f"{INDEX_FILE} places tensor {name} in {path}, but that file lacks it")
                specs.append(header[name])
        return specs

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard, names in self._shards.items():
            path = os.path.join(self.source, shard)
            header = read_header(path)  # validates truncation before safe_open maps it
            try:
                with safe_open(path, framework="pt", device=self.device) as shard_file:
                    for name in names or header:
                        yield name, shard_file.get_tensor(name)
            except SafetensorError as error:
                raise CheckpointError(f"{path} could not be read: {error}") from error

    def tokenizer_files(self) -> dict[str, bytes]:
        return tokenizer_files(self.source)


def read_header(path: str) -> dict[str, TensorSpec]:
    """Parse a safetensors header: HF name -> TensorSpec, in file order.

    Checks what safe_open would only report vaguely, naming the tensor: every
    shape matches its byte range, and the file is long enough to hold them all
    (a truncated download is the usual cause).
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated: {file_size} bytes, too short for a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > file_size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_size} bytes, "
                f"the file has {file_size}"
            )
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {error}") from error
    data_size = file_size - 8 - header_size
    specs = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
        shape = tuple(int(size) for size in entry["shape"])
        begin, end = entry["data_offsets"]
        numel = 1
        for size in shape:
            numel *= size
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(
                f"{path}: tensor {name} declares shape {list(shape)} ({entry['dtype']}) but spans "
                f"{end - begin} bytes; the header is corrupt"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {end} of the data section, "
                f"which holds only {data_size} bytes; download the file again"
            )
        specs[name] = TensorSpec(name, shape, dtype, entry["dtype"], path)
    return specs
