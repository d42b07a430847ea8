"""Resolving a Hugging Face model id ("org/name") to its folder in the local HF cache, offline.

The loader never downloads. `huggingface-cli download org/name` (or any
transformers `from_pretrained`) leaves the files in the cache as
`<hub cache>/models--org--name/snapshots/<commit>/`, with `refs/<branch>`
holding the commit a branch points to; this module reads that layout.
"""

from __future__ import annotations

import os
import re

from llmexec.errors import NotFoundError

# "org/name" or a bare legacy "name", optionally "@revision".
_MODEL_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<revision>[\w./-]+))?")


def hub_cache_dir() -> str:
    """Where the hub cache is, read from the environment now (as huggingface_hub does at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "huggingface", "hub")


def resolve_model_path(model: str) -> str:
    """An existing local path, made absolute; else a model id's snapshot folder in the HF cache.

    Raises NotFoundError, saying where it looked, when neither exists.
    """
    local = os.path.expanduser(model)
    if os.path.exists(local):
        return os.path.abspath(local)
    match = _MODEL_ID.fullmatch(model)
    if match is None or model.startswith((".", "/", "~")):
        raise NotFoundError(f"checkpoint {model!r} does not exist (expected a model folder, a .gguf file or a config.json)")
    repo, revision = match.group("repo"), match.group("revision") or "main"
    cache = hub_cache_dir()
    repo_dir = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = _snapshot(repo_dir, revision)
    if snapshot is None:
        raise NotFoundError(
            f"model {model!r} is neither a local path nor in the Hugging Face cache "
            f"(looked for revision {revision!r} in {repo_dir}; the cache is {cache}, set by HF_HUB_CACHE or HF_HOME). "
            f"This loader never downloads: fetch it first, e.g. `huggingface-cli download {repo}`, "
            "or pass a local path"
        )
    return snapshot


def _snapshot(repo_dir: str, revision: str) -> str | None:
    snapshots = os.path.join(repo_dir, "snapshots")
    if not os.path.isdir(snapshots):
        return None
    ref = os.path.join(repo_dir, "refs", revision)
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as file:
            revision = file.read().strip()
    candidate = os.path.join(snapshots, revision)
    if os.path.isdir(candidate):
        return candidate
    # A branch's ref is missing (files copied without refs/): one snapshot is unambiguous.
    present = os.listdir(snapshots)
    if revision == "main" and len(present) == 1:
        return os.path.join(snapshots, present[0])
    return None
