"""The deployment a user runs, checked from outside: one suite, two ways to run it.

- "compose": docker/compose.yaml built and started with `docker compose up`
  (needs a Docker engine and the compose plugin; skipped, with the reason,
  where there is none, as on our CI machines).
- "local": the same services, as local processes (`python -m llmexec.<service>`)
  with the compose file's commands and LLMEXEC_* settings, only the addresses,
  ports, secret paths and model path translated to this machine; Redis is a
  local redis-server with the same password. This one always runs.

Both serve the demo model behind the bearer token and a password-protected
Redis; the tests talk to them only through published ports.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import yaml

from llmexec.redis_server import EmbeddedRedis, free_port
from llmexec.rpc.auth import bearer_metadata
from llmexec.rpc.client import check_health
from llmexec.scheduler.state_store import SequenceStore
from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
SERVICES = {"loader": "llmexec.v1.LoaderService", "runner": "llmexec.v1.RunnerService",
            "scheduler": "llmexec.v1.SchedulerService"}


@dataclass
class Deployment:
    kind: str
    addresses: dict[str, str]       # service -> host:port of its gRPC port
    health: dict[str, str]          # service -> host:port of its plaintext health port
    redis_url: str
    redis_password: str
    token: str
    terminate: Callable[[str], None]        # send SIGTERM to a service
    exit_code: Callable[[str], int | None]  # None while it runs


def docker_unavailable() -> str:
    """Why the compose deployment cannot run here ("" when it can)."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine ({reason})"
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        return "the docker compose plugin is not installed"
    return ""


def write_secrets(folder: Path) -> tuple[str, str]:
    token, password = secrets.token_hex(16), secrets.token_hex(16)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "api-token").write_text(token + "\n")
    (folder / "redis-password").write_text(password + "\n")
    return token, password


def compose_deployment(folder: Path):
    token, password = write_secrets(folder / "secrets")
    env = {**os.environ, "LLMEXEC_SECRETS_DIR": str(folder / "secrets")}
    compose = ["docker", "compose", "-f", str(COMPOSE), "-p", "llmexec-integration"]
    up = subprocess.run([*compose, "up", "-d", "--build", "--wait"], env=env, capture_output=True, text=True,
                        timeout=3600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        published = {name: {int(p.split(":")[-1]) for p in spec.get("ports", [])}
                     for name, spec in yaml.safe_load(COMPOSE.read_text())["services"].items()}

        def exit_code(service: str) -> int | None:
            out = subprocess.run([*compose, "ps", "-a", "--format", "{{.State}} {{.ExitCode}}", service], env=env,
                                 capture_output=True, text=True).stdout.split()
            return int(out[1]) if out and out[0] == "exited" else None

        yield Deployment(
            kind="compose",
            addresses={n: f"127.0.0.1:{min(published[n])}" for n in SERVICES},
            health={n: f"127.0.0.1:{max(published[n])}" for n in SERVICES},
            redis_url="redis://127.0.0.1:16379/0", redis_password=password, token=token,
            terminate=lambda s: subprocess.run([*compose, "kill", "-s", "SIGTERM", s], env=env, check=True),
            exit_code=exit_code,
        )
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, capture_output=True, timeout=600)


def local_deployment(folder: Path):
    """Start the compose file's services as processes on this machine."""
    from llmexec.demo_model import demo_model_path

    spec = yaml.safe_load(COMPOSE.read_text())
    token, password = write_secrets(folder / "secrets")
    secret_files = {name: Path(s["file"].replace("${LLMEXEC_SECRETS_DIR:-./secrets}", str(folder / "secrets")))
                    for name, s in spec["secrets"].items()}
    port_map = {int(p.split(":")[-1]): free_port() for s in spec["services"].values() for p in s.get("ports", [])}
    with EmbeddedRedis(password=password) as redis_server:

        def localize(value: str) -> str:
            if value.isdigit() and int(value) in port_map:
                return str(port_map[int(value)])
            if m := re.fullmatch(r"(loader|runner|scheduler):(\d+)", value):
                return f"127.0.0.1:{port_map[int(m.group(2))]}"
            if value.startswith("redis://redis:"):
                return redis_server.url
            if value.startswith("/run/secrets/"):
                return str(secret_files[value.removeprefix("/run/secrets/")])
            return value

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMEXEC_")}
        # What the image adds: the demo model's path.
        base_env["LLMEXEC_MODEL"] = str(demo_model_path())
        procs: dict[str, subprocess.Popen] = {}
        try:
            for name in SERVICES:
                service = spec["services"][name]
                env = {**base_env, **{k: localize(str(v)) for k, v in service["environment"].items()}}
                with open(folder / f"{name}.log", "wb") as log:
                    procs[name] = subprocess.Popen([sys.executable, *service["command"][1:]], env=env, stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            # compose publishes [service port, health port]: the service port is the lower one in both.
            ports = {n: sorted(int(p.split(":")[-1]) for p in spec["services"][n]["ports"]) for n in SERVICES}
            deployment = Deployment(
                kind="local",
                addresses={n: f"127.0.0.1:{port_map[ports[n][0]]}" for n in SERVICES},
                health={n: f"127.0.0.1:{port_map[ports[n][1]]}" for n in SERVICES},
                redis_url=redis_server.url, redis_password=password, token=token,
                terminate=lambda s: procs[s].send_signal(signal.SIGTERM),
                exit_code=lambda s: procs[s].poll(),
            )
            deadline = time.monotonic() + 300
            for name, service_name in SERVICES.items():
                while check_health(deployment.health[name], service_name) != "SERVING":
                    logs = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in folder.glob("*.log"))
                    assert procs[name].poll() is None, f"{name} exited:\n{logs}"
                    assert time.monotonic() < deadline, f"{name} not SERVING after 300 s:\n{logs}"
                    time.sleep(0.2)
            yield deployment
        finally:
            for proc in reversed(list(procs.values())):
                if proc.poll() is None:
                    proc.terminate()
                try:
                    proc.wait(45)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module", params=["compose", "local"])
def deployment(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"deployment-{request.param}")
    if request.param == "compose":
        reason = docker_unavailable()
        if reason:
            pytest.skip(f"compose deployment not run: {reason}; the same suite ran against local processes")
        yield from compose_deployment(folder)
    else:
        yield from local_deployment(folder)


def chat(prompt: str, max_tokens: int = 12, **params) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        messages=[scheduler_pb2.ChatMessage(role="user", content=prompt)],
        sampling_params=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, **params),
    )


def generate(d: Deployment, request, metadata=None) -> list[scheduler_pb2.GenerateResponse]:
    with grpc.insecure_channel(d.addresses["scheduler"]) as channel:
        return list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(
            request, timeout=300, metadata=bearer_metadata(d.token) if metadata is None else metadata))


def test_every_service_is_serving_on_its_health_port(deployment):
    for name, service in SERVICES.items():
        assert check_health(deployment.health[name], service) == "SERVING"
        assert check_health(deployment.health[name], "liveness") == "SERVING"


def test_chat_completions_with_the_token(deployment):
    prompts = ["What is the capital of France?", "List three primary colors."]
    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(lambda p: generate(deployment, chat(p)), prompts))
    assert "Paris" in "".join(r.text for r in streams[0])
    for stream in streams:
        assert stream[0].request_id and stream[-1].completion_tokens == sum(len(r.token_ids) for r in stream)
        assert stream[-1].finish_reason in (scheduler_pb2.FINISH_REASON_STOP, scheduler_pb2.FINISH_REASON_LENGTH)


def test_calls_without_the_token_are_unauthenticated(deployment):
    for metadata in ((), bearer_metadata("not-" + deployment.token)):
        with pytest.raises(grpc.RpcError) as err:
            generate(deployment, chat("Hello"), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl not installed (pip install -e .[dev])")
def test_grpcurl_lists_without_a_token_and_calls_with_it(deployment):
    address = deployment.addresses["scheduler"]
    listed = subprocess.run(["grpcurl", "-plaintext", address, "list"], capture_output=True, text=True, timeout=60)
    assert "llmexec.v1.SchedulerService" in listed.stdout.split(), listed.stderr
    body = '{"prompt": "The capital of France is", "sampling_params": {"max_tokens": 8, "temperature": 0}}'
    called = subprocess.run(["grpcurl", "-plaintext", "-H", f"authorization: Bearer {deployment.token}", "-d", body,
                             address, "llmexec.v1.SchedulerService/Generate"], capture_output=True, text=True,
                            timeout=120)
    assert called.returncode == 0 and '"request_id"' in called.stdout, called.stderr


def test_sequence_state_is_in_the_password_protected_redis(deployment):
    stream = generate(deployment, scheduler_pb2.GenerateRequest(
        prompt="One, two, three,", request_id=f"integration-{deployment.kind}",
        sampling_params=sampling_pb2.SamplingParams(max_tokens=4, temperature=0)))
    client = redis.Redis.from_url(deployment.redis_url, password=deployment.redis_password)
    seq = SequenceStore(client).load(f"integration-{deployment.kind}")
    assert seq is not None and seq.output_token_ids == [t for r in stream for t in r.token_ids]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(deployment.redis_url).keys()


def test_sigterm_drains_the_running_generation_then_exits(deployment):
    # Last in this file: it stops the scheduler.
    new_tokens = 24
    request = scheduler_pb2.GenerateRequest(prompt="Tell me a long story about a lighthouse keeper.",
                                            sampling_params=sampling_pb2.SamplingParams(
                                                max_tokens=new_tokens, temperature=0, ignore_eos=True))
    received, signalled_at = [], None
    with grpc.insecure_channel(deployment.addresses["scheduler"]) as channel:
        call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(
            request, timeout=120, metadata=bearer_metadata(deployment.token))
        for reply in call:
            received.append(reply)
            if signalled_at is None:
                deployment.terminate("scheduler")
                signalled_at = time.monotonic()
    assert sum(len(r.token_ids) for r in received) == new_tokens
    assert received[-1].finish_reason == scheduler_pb2.FINISH_REASON_LENGTH
    # It stops taking work, then exits on its own within the drain time.
    deadline = time.monotonic() + 40
    while deployment.exit_code("scheduler") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert deployment.exit_code("scheduler") == 0
    assert check_health(deployment.health["scheduler"], "liveness") == "UNAVAILABLE"
