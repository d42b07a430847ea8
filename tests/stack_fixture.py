"""Start a real stack (`llmexec up --detach`) for tests, and stop it after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Stack:
    home: Path
    records: dict

    @property
    def scheduler(self) -> str:
        return self.records["scheduler"]["address"]

    @property
    def loader(self) -> str:
        return self.records["loader"]["address"]

    @property
    def runner(self) -> str:
        return self.records["runner"]["address"]

    @property
    def redis_url(self) -> str:
        return self.records["redis"]["address"]

    def env(self) -> dict:
        return {**os.environ, "LLMEXEC_HOME": str(self.home)}

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmexec", *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def down(self) -> None:
        self.cli("down", timeout=120)


def start_stack(home: Path, model: str, *extra: str) -> Stack:
    home.mkdir(parents=True, exist_ok=True)
    stack = Stack(home=home, records={})
    result = stack.cli("up", "--detach", "--model", model, "--scheduler-port", "0", "--loader-port", "0",
                       "--runner-port", "0", *extra, timeout=900)
    if result.returncode != 0:
        logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in (home / "logs").glob("*.log"))
        stack.down()
        raise RuntimeError(f"llmexec up failed:\n{result.stdout}\n{result.stderr}\n{logs}")
    stack.records = json.loads((home / "stack.json").read_text())
    stack.up_output = result.stdout
    return stack
