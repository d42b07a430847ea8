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
