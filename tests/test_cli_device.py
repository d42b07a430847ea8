"""`llmexec up --device`: the flags reach the loader and runner, and a missing GPU is refused up front."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from llmexec.cli.main import add_up_parser
from llmexec.cli.stack import ServiceRecord, service_argv


def up_args(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_up_parser(parser.add_subparsers(dest="command"))
    return vars(parser.parse_args(["up", "--model", "m", *argv]))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_device_dtype_and_memory_share_reach_the_services():
    opts = up_args("--device", "cuda:1", "--dtype", "float16", "--gpu-memory-utilization", "0.5")
    records = {"loader": ServiceRecord("loader", "127.0.0.1:1", 1)}
    loader = service_argv("loader", 1, records, opts)
    runner = service_argv("runner", 2, records, opts)
    assert (flag(loader, "--device"), flag(loader, "--dtype")) == ("cuda:1", "float16")
    assert (flag(runner, "--device"), flag(runner, "--gpu-memory-utilization")) == ("cuda:1", "0.5")


def test_cpu_by_default_with_the_loaders_own_dtype_default():
    opts = up_args()
    records = {"loader": ServiceRecord("loader", "127.0.0.1:1", 1)}
    loader = service_argv("loader", 1, records, opts)
    runner = service_argv("runner", 2, records, opts)
    assert (flag(loader, "--device"), flag(loader, "--dtype")) == ("cpu", "")
    assert flag(runner, "--device") == "cpu" and "--gpu-memory-utilization" not in runner


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_up_device_cuda_without_a_gpu_is_refused_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llmexec", "up", "--device", "cuda"], capture_output=True, text=True,
                          env={**os.environ, "LLMEXEC_HOME": str(tmp_path)}, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--device cpu" in done.stderr
    assert not (tmp_path / "stack.json").exists() and not (tmp_path / "logs").exists()


def test_malformed_device_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llmexec", "up", "--device", "gpu0"], capture_output=True, text=True,
                          env={**os.environ, "LLMEXEC_HOME": str(tmp_path)}, timeout=120)
    assert done.returncode == 2 and "expected cpu, cuda or cuda:N" in done.stderr
