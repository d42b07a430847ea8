"""The .proto files lint clean and the checked-in generated code matches them."""

from __future__ import annotations

import filecmp
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def buf_binary() -> str | None:
    local = REPO / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


@pytest.mark.skipif(buf_binary() is None, reason="buf is not installed: `npm install --no-save @bufbuild/buf` (make test does)")
def test_buf_lint_standard_is_clean():
    result = subprocess.run([buf_binary(), "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed (pip install -e .[dev])")
def test_generated_code_is_in_sync(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "generate_protos.py"), str(tmp_path)], check=True,
                   capture_output=True)
    fresh = tmp_path / "llmexec" / "v1"
    checked_in = REPO / "src" / "llmexec" / "v1"
    fresh_names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    checked_names = sorted(p.name for p in checked_in.iterdir() if p.is_file())
    assert fresh_names == checked_names
    _, mismatch, errors = filecmp.cmpfiles(fresh, checked_in, fresh_names, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch}: run python scripts/generate_protos.py"


def test_services_follow_buf_naming():
    from llmexec.v1 import loader_pb2, runner_pb2, scheduler_pb2

    names = {
        s.full_name
        for mod in (loader_pb2, runner_pb2, scheduler_pb2)
        for s in mod.DESCRIPTOR.services_by_name.values()
    }
    assert names == {"llmexec.v1.LoaderService", "llmexec.v1.RunnerService", "llmexec.v1.SchedulerService"}
