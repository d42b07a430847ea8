"""Read a container's command and environment the way the service itself will.

The Kubernetes manifests and the compose file configure the services through
`python -m llmexec.<service>` and LLMEXEC_* variables. These helpers run the
service's own argument parser on them, so a renamed flag or variable fails a
test here instead of a pod in a cluster.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re

import pytest

import llmexec.rpc.transport_args

SERVICES = ("loader", "runner", "scheduler")


def service_of(command: list[str]) -> str:
    """["python", "-m", "llmexec.runner", ...] -> "runner"."""
    assert command[:2] == ["python", "-m"] and command[2].startswith("llmexec."), command
    service = command[2].removeprefix("llmexec.")
    assert service in SERVICES, command
    return service


def known_env_vars(service: str) -> set[str]:
    """Every LLMEXEC_* variable the service's parse_args (or its amain) reads."""
    sources = inspect.getsource(importlib.import_module(f"llmexec.{service}.__main__"))
    sources += inspect.getsource(llmexec.rpc.transport_args).replace("{service.upper()}", service.upper())
    return set(re.findall(r"LLMEXEC_[A-Z_]+[A-Z]", sources))


def parse_settings(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The service's parsed arguments under exactly this environment."""
    service = service_of(command)
    unknown = {name for name in env if name.startswith("LLMEXEC_")} - known_env_vars(service)
    assert not unknown, f"{service} reads no {sorted(unknown)}"
    for name in list(os.environ):
        if name.startswith("LLMEXEC_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main = importlib.import_module(f"llmexec.{service}.__main__")
    return main.parse_args(command[3:])
