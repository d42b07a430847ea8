"""One spelling for the config keys every model and the KV-cache sizing read.

Older architectures' config.json files use their own names (GPT-2: n_embd, n_layer,
n_head, n_positions; BLOOM: n_layer, n_head); transformers maps them with a per-class
attribute_map, but we read config.json as a plain dict.
"""

from __future__ import annotations

from collections.abc import Mapping

# config.json alias -> the name the code reads.
_ALIASES = {
    "n_embd": "hidden_size",
    "n_embed": "hidden_size",  # early BLOOM configs
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
    "n_inner": "intermediate_size",
}


def standard_config(config: Mapping) -> dict:
    """A copy of an HF config dict that also carries the standard key for each alias present."""
    standard = dict(config)
    for alias, key in _ALIASES.items():
        if alias in config and key not in config:
            standard[key] = config[alias]
    return standard
