"""What every Hugging Face model folder holds besides its weights: config.json and tokenizer files.

Shared by the readers of safetensors, PyTorch .bin and dummy checkpoints, which
differ only in where their tensors come from.
"""

from __future__ import annotations

import json
import os

from llmexec.errors import CheckpointError

# Files `save_pretrained` writes for a tokenizer (and generation defaults,
# which carry the stop tokens a chat model needs).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Without one of these there is no tokenizer, whatever else is present.
_TOKENIZER_DEFINING = {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json"}


def read_json(path: str, what: str) -> dict:
    """Parse a JSON file; CheckpointError naming `path` when it is missing or corrupt."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a Hugging Face model folder needs {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def tokenizer_files(folder: str) -> dict[str, bytes]:
    """File name -> content of the tokenizer files in `folder`; {} when it has no tokenizer."""
    present = {name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))}
    if not present & _TOKENIZER_DEFINING:
        return {}
    files = {}
    for name in sorted(present):
        with open(os.path.join(folder, name), "rb") as file:
            files[name] = file.read()
    return files


def open_folder(source: str, weights: str) -> dict:
    """config.json of a Hugging Face folder; CheckpointError when source is not a folder.

    weights names what the folder should hold (e.g. "the .safetensors files") for the message.
    """
    if not os.path.isdir(source):
        raise CheckpointError(
            f"{source} is not a folder; pass the Hugging Face model folder that holds config.json and {weights}"
        )
    return read_json(os.path.join(source, "config.json"), what="config.json")


def find_shards(source: str, single_file: str, index_file: str) -> dict[str, list[str]] | None:
    """Shard file -> the tensor names its index places there, in index order.

    {single_file: []} for an unsharded folder ([] means "every tensor in the file");
    None when the folder has neither file. A shard the index lists but the folder
    lacks is a CheckpointError naming it.
    """
    index_path = os.path.join(source, index_file)
    if os.path.exists(index_path):
        weight_map = read_json(index_path, what=index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map; the index is corrupt")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            if not os.path.isfile(os.path.join(source, shard)):
                raise CheckpointError(
                    f"{index_file} in {source} lists shard {shard} (holding e.g. {names[0]}), "
                    "but that file is missing; the download is incomplete"
                )
        return shards
    if os.path.isfile(os.path.join(source, single_file)):
        return {single_file: []}
    return None
