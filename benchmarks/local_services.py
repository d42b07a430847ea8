"""Start loader, runner(s) and scheduler as separate processes for a benchmark, and stop them.

    with LocalServices(tmpdir) as services:
        loader = services.loader(model_folder)
        runner = services.runner(loader, num_blocks=4096)
        scheduler = services.scheduler([runner], loader, "--no-prefix-caching")

Each call returns the service's address once it is SERVING. The scheduler
gets a private embedded Redis. Logs go to <tmpdir>/<name>.log.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from llmexec.redis_server import free_port
from llmexec.rpc.client import check_health

SERVICES = {"loader": "llmexec.v1.LoaderService", "runner": "llmexec.v1.RunnerService",
            "scheduler": "llmexec.v1.SchedulerService"}


class LocalServices:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.procs: dict[str, subprocess.Popen] = {}

    def loader(self, model: str, *extra: str) -> str:
        return self._start("loader", "loader", ["--model", model, *extra])

    def runner(self, loader: str, block_size: int = 16, num_blocks: int = 4096, name: str = "runner") -> str:
        return self._start(name, "runner", ["--loader", loader, "--block-size", str(block_size),
                                            "--num-blocks", str(num_blocks)])

    def scheduler(self, runners: list[str], loader: str, *extra: str, name: str = "scheduler") -> str:
        return self._start(name, "scheduler", ["--runner", ",".join(runners), "--loader", loader,
                                               "--redis-url", "embedded", *extra])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _start(self, name: str, kind: str, args: list[str], timeout: float = 600) -> str:
        port = free_port()
        log = open(self.folder / f"{name}.log", "wb")
        self.procs[name] = proc = subprocess.Popen(
            [sys.executable, "-m", f"llmexec.{kind}", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while check_health(address, SERVICES[kind]) != "SERVING":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.folder / f'{name}.log'}:\n"
                                   f"{(self.folder / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.2)
        return address

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def save_random_llama(folder: Path, **overrides) -> Path:
    """A random Llama checkpoint (the benchmark measures the scheduler, not the weights)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096, eos_token_id=None,
                  bos_token_id=None)
    config.update(overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**config)).save_pretrained(folder)
    return folder
