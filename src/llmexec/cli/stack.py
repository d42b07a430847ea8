"""Start, inspect and stop the local stack: Redis, loader, runner, scheduler.

Each service is its own process (`python -m llmexec.<service>`), started in
its own session so a Ctrl-C reaches only `llmexec up`, which then stops them
in order. A detached stack is recorded in <state dir>/stack.json.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmexec.rpc.client import check_health

ORDER = ["redis", "loader", "runner", "scheduler"]
GRPC_SERVICES = {
    "loader": "llmexec.v1.LoaderService",
    "runner": "llmexec.v1.RunnerService",
    "scheduler": "llmexec.v1.SchedulerService",
}


def state_dir() -> Path:
    return Path(os.environ.get("LLMEXEC_HOME", Path.home() / ".llmexec"))


@dataclass
class ServiceRecord:
    name: str
    address: str
    pid: int  # 0 when the service is external (a --redis-url we did not start)
    log: str = ""

    def alive(self) -> bool:
        if self.pid == 0:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie child of ours counts as dead.
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    def health(self) -> str:
        if not self.alive():
            return "NOT_RUNNING"
        if self.name in GRPC_SERVICES:
            return check_health(self.address, GRPC_SERVICES[self.name])
        return redis_health(self.address)


def redis_health(address: str) -> str:
    import redis

    try:
        redis.Redis.from_url(address, socket_timeout=2).ping()
        return "SERVING"
    except redis.RedisError:
        return "NOT_SERVING"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_state() -> dict[str, ServiceRecord]:
    path = state_dir() / "stack.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {name: ServiceRecord(**rec) for name, rec in data.items()}


def save_state(records: dict[str, ServiceRecord]) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    (state_dir() / "stack.json").write_text(json.dumps({n: asdict(r) for n, r in records.items()}, indent=2))


def clear_state() -> None:
    (state_dir() / "stack.json").unlink(missing_ok=True)


def spawn(name: str, argv: list[str], address: str) -> ServiceRecord:
    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return ServiceRecord(name=name, address=address, pid=proc.pid, log=str(log_path))


def start_redis(port: int) -> ServiceRecord:
    from llmexec.redis_server import redis_server_executable

    data_dir = state_dir() / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
    ]
    return spawn("redis", argv, f"redis://127.0.0.1:{port}/0")


def service_argv(name: str, port: int, records: dict[str, ServiceRecord], opts: dict) -> list[str]:
    py = [sys.executable, "-m", f"llmexec.{name}", "--host", "127.0.0.1", "--port", str(port)]
    if name == "loader":
        return py + ["--model", opts["model"], "--dtype", opts.get("dtype") or "", "--load-format", opts["load_format"],
                     "--device", opts.get("device") or "cpu",
                     "--quantization", opts.get("quantization", ""),
                     "--quantization-group-size", str(opts.get("quantization_group_size", 0)),
                     "--tensor-parallel-size", str(opts.get("tensor_parallel_size") or 1)]
    if name == "runner":
        argv = py + ["--loader", records["loader"].address, "--block-size", str(opts["block_size"]),
                     "--kv-cache-gib", str(opts["kv_cache_gib"]), "--device", opts.get("device") or "cpu"]
        if opts.get("gpu_memory_utilization") is not None:
            argv += ["--gpu-memory-utilization", str(opts["gpu_memory_utilization"])]
        if opts.get("num_blocks"):
            argv += ["--num-blocks", str(opts["num_blocks"])]
        return argv
    argv = py + ["--runner", records["runner"].address, "--loader", records["loader"].address,
                 "--redis-url", records["redis"].address, "--max-num-seqs", str(opts["max_num_seqs"])]
    for flag, key in (("--max-num-batched-tokens", "max_num_batched_tokens"), ("--max-queue-len", "max_queue_len"),
                      ("--metrics-port", "metrics_port")):
        if opts.get(key) is not None:
            argv += [flag, str(opts[key])]
    if opts.get("no_prefix_caching"):
        argv.append("--no-prefix-caching")
    return argv


def up(opts: dict) -> dict[str, ServiceRecord]:
    """Start whatever part of the stack is not running; return every service's record.

    A service that is recorded, alive and SERVING is kept. Raises RuntimeError
    (with the failing service's log tail) when a service dies or never serves.
    """
    recorded = load_state()
    records = {n: r for n, r in recorded.items() if r.alive()}
    ports = {"loader": opts["loader_port"], "runner": opts["runner_port"], "scheduler": opts["scheduler_port"]}
    # A service that died comes back on its old port, so the services that talk to it
    # (a scheduler to its runner) and clients (resuming their streams) find it again.
    for name, rec in recorded.items():
        if name in ports and name not in records and not ports[name]:
            ports[name] = int(rec.address.rsplit(":", 1)[1])
    started: list[str] = []
    if "redis" not in records or (opts.get("redis_url") and records["redis"].address != opts["redis_url"]):
        if opts.get("redis_url"):
            records["redis"] = ServiceRecord("redis", opts["redis_url"], 0)
        else:
            records["redis"] = start_redis(opts["redis_port"] or free_port())
            started.append("redis")
    for name in ORDER[1:]:
        if name in records:
            continue
        port = ports[name] or free_port()
        records[name] = spawn(name, service_argv(name, port, records, opts), f"127.0.0.1:{port}")
        started.append(name)
    save_state(records)
    wait_serving(records, started, timeout=opts.get("timeout", 900))
    return records


def wait_serving(records: dict[str, ServiceRecord], names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        for name in list(pending):
            rec = records[name]
            if not rec.alive():
                raise RuntimeError(f"{name} exited during start-up; last lines of {rec.log}:\n{tail(rec.log)}")
            if rec.health() == "SERVING":
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(pending)} not SERVING after {timeout:.0f}s; see {state_dir() / 'logs'}")
        time.sleep(0.25)


def tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(records: dict[str, ServiceRecord] | None = None, timeout: float = 20.0) -> list[str]:
    """Stop the recorded services, scheduler first; returns the names stopped."""
    records = load_state() if records is None else records
    stopped = []
    for name in reversed(ORDER):
        rec = records.get(name)
        if rec is None or rec.pid == 0 or not rec.alive():
            continue
        try:
            os.kill(rec.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while rec.alive() and time.monotonic() < deadline:
            reap(rec.pid)
            time.sleep(0.1)
        if rec.alive():
            os.kill(rec.pid, signal.SIGKILL)
        reap(rec.pid)
        stopped.append(name)
    clear_state()
    return stopped


def reap(pid: int) -> None:
    """Collect a child that exited so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def describe(records: dict[str, ServiceRecord]) -> list[str]:
    lines = []
    for name in ORDER:
        rec = records.get(name)
        if rec is None:
            lines.append(f"{name:<10} -")
            continue
        pid = rec.pid if rec.pid else "external"
        lines.append(f"{name:<10} {rec.address:<28} pid {pid!s:<8} {rec.health()}")
    return lines
