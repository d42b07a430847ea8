from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from stack_fixture import start_stack


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    from llmexec.demo_model import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def demo_stack(tmp_path_factory, demo_gguf):
    stack = start_stack(tmp_path_factory.mktemp("demo-stack"), str(demo_gguf), "--max-num-seqs", "16")
    yield stack
    stack.down()


@pytest.fixture(scope="session")
def hf_demo(demo_gguf):
    """transformers' model and tokenizer for the demo GGUF, float32: the oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(demo_gguf.parent), demo_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer
