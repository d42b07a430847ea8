"""No request lost when a process dies; several runners behind one scheduler; metrics.

One module-scoped stack (`llmexec up --detach`) on a tiny random Llama. An
undisturbed run of 20 greedy streams is the reference; then the same prompts
run again while a process is killed with SIGKILL and `llmexec up --detach`
starts it again. Scheduler kill: every client's stream breaks, the client
resumes with ResumeGenerate(request_id, offset = tokens received). Runner
kill: the scheduler notices, waits for the runner, recomputes the KV cache,
and the streams go on. Every completion must equal the undisturbed one.

The data-parallel test starts two more runners on the stack's loader and a
second scheduler in front of both (its own Redis key prefix), as Kubernetes
would run them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
import torch
from stack_fixture import start_stack

from llmexec.redis_server import free_port
from llmexec.rpc.client import check_health
from llmexec.scheduler.state_store import SequenceStore
from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

NUM_STREAMS = 20
MAX_TOKENS = 200  # long enough that no stream ends before the kill, whatever the start skew (async scheduling is fast)
STACK_ARGS = ("--block-size", "4", "--num-blocks", "2048", "--max-num-seqs", "32")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    # A wide initializer spreads the logits, so greedy never hinges on a near-tie
    # that a recompute's different rounding could flip.
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, eos_token_id=None,
                         bos_token_id=None, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("durable-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_folder):
    stack = start_stack(tmp_path_factory.mktemp("durable-stack"), str(tiny_folder), *STACK_ARGS)
    yield stack
    stack.down()


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(0, 300, (12,), generator=gen).tolist()
    out = []
    for i in range(NUM_STREAMS):
        own = torch.randint(0, 300, (3 + (i * 7) % 30,), generator=gen).tolist()
        out.append(shared + own if i % 3 == 0 else own)  # some share a prefix: the prefix cache is in play
    return out


def request(prompt: list[int], request_id: str) -> scheduler_pb2.GenerateRequest:
    params = sampling_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    if int(request_id.rsplit("-", 1)[1]) % 4 == 1:
        # Penalties need the runner's token history, which a restarted runner lacks.
        params.repetition_penalty, params.presence_penalty = 1.3, 0.2
    return scheduler_pb2.GenerateRequest(prompt_token_ids=prompt, request_id=request_id, sampling_params=params)


def run_undisturbed(address: str, tag: str) -> list[list[int]]:
    def one(i_prompt):
        i, prompt = i_prompt
        with grpc.insecure_channel(address) as channel:
            replies = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request(prompt, f"{tag}-{i}"),
                                                                                timeout=120)
            return [t for r in replies for t in r.token_ids]

    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        return list(pool.map(one, enumerate(prompts())))


class ResumingClient:
    """Streams one request; when the stream breaks, resumes it by id and offset until it finishes."""

    def __init__(self, address: str, prompt: list[int], request_id: str, started: threading.Barrier):
        self.address, self.prompt, self.request_id, self.started = address, prompt, request_id, started
        self.tokens: list[int] = []
        self.received_at_break: int | None = None
        self.finish_reason = 0

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            try:
                self._read(stub.Generate(request(self.prompt, self.request_id), timeout=120), wait_at=3)
                return
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                self.received_at_break = len(self.tokens)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # A new channel each time: the old one may wait out a reconnect backoff.
            with grpc.insecure_channel(self.address) as channel:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                resume = scheduler_pb2.ResumeGenerateRequest(request_id=self.request_id, offset=len(self.tokens))
                try:
                    self._read(stub.ResumeGenerate(resume, timeout=120))
                    return
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            time.sleep(0.2)
        raise TimeoutError(f"{self.request_id} never resumed")

    def _read(self, replies, wait_at: int | None = None) -> None:
        for reply in replies:
            self.tokens += reply.token_ids
            if wait_at is not None and len(self.tokens) >= wait_at:
                wait_at = None
                self.started.wait(timeout=60)  # every stream is mid-generation: the test may kill now
            if reply.finish_reason:
                self.finish_reason = reply.finish_reason


def run_with_kill(stack, tiny_folder, tag: str, victim: str) -> list[ResumingClient]:
    started = threading.Barrier(NUM_STREAMS + 1)
    clients = [ResumingClient(stack.scheduler, p, f"{tag}-{i}", started) for i, p in enumerate(prompts())]
    threads = [threading.Thread(target=c.run) for c in clients]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    os.kill(stack.records[victim]["pid"], signal.SIGKILL)
    again = stack.cli("up", "--detach", "--model", str(tiny_folder), "--scheduler-port", "0", "--loader-port", "0",
                      "--runner-port", "0", *STACK_ARGS)
    assert again.returncode == 0, again.stdout + again.stderr
    for t in threads:
        t.join(timeout=180)
    new_records = json.loads((stack.home / "stack.json").read_text())
    assert new_records[victim]["pid"] != stack.records[victim]["pid"]
    assert new_records[victim]["address"] == stack.records[victim]["address"]  # back where it was
    stack.records = new_records
    return clients


def test_kill_scheduler_mid_generation_clients_resume_and_match(stack, tiny_folder):
    reference = run_undisturbed(stack.scheduler, "calm")
    assert all(len(r) == MAX_TOKENS for r in reference)
    clients = run_with_kill(stack, tiny_folder, "sched-kill", "scheduler")
    broken = [c.received_at_break for c in clients if c.received_at_break is not None]
    assert len(broken) == NUM_STREAMS  # every stream went through the scheduler that died
    assert all(3 <= n < MAX_TOKENS for n in broken)  # ... in the middle of its generation
    for client, expected in zip(clients, reference):
        assert client.tokens == expected, client.request_id
        assert client.finish_reason == scheduler_pb2.FINISH_REASON_LENGTH
    # Redis has them all, finished.
    store = SequenceStore(redis.Redis.from_url(stack.redis_url))
    assert store.active_ids() == set()
    assert store.load("sched-kill-0").output_token_ids == reference[0]

    # A finished request can be resumed from any offset, from Redis.
    with grpc.insecure_channel(stack.scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        replies = list(stub.ResumeGenerate(scheduler_pb2.ResumeGenerateRequest(request_id="sched-kill-5", offset=70)))
        assert [t for r in replies for t in r.token_ids] == reference[5][70:]
        assert replies[-1].finish_reason == scheduler_pb2.FINISH_REASON_LENGTH
        assert replies[-1].completion_tokens == MAX_TOKENS
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ResumeGenerate(scheduler_pb2.ResumeGenerateRequest(request_id="no-such-request")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_kill_runner_mid_generation_scheduler_recomputes_and_matches(stack, tiny_folder):
    reference = run_undisturbed(stack.scheduler, "calm-again")
    clients = run_with_kill(stack, tiny_folder, "runner-kill", "runner")
    assert all(c.received_at_break is None for c in clients)  # the scheduler kept every stream open
    for client, expected in zip(clients, reference):
        assert client.tokens == expected, client.request_id
    with grpc.insecure_channel(stack.scheduler) as channel:
        info = scheduler_pb2_grpc.SchedulerServiceStub(channel).GetServerInfo(scheduler_pb2.GetServerInfoRequest())
    assert info.runners[0].healthy and info.free_blocks == info.num_blocks
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{info.metrics_port}/metrics", timeout=10).read().decode()
    recoveries = [line for line in metrics.splitlines() if line.startswith("llmexec:runner_recoveries_total")]
    assert recoveries and float(recoveries[0].split()[-1]) >= 1


@pytest.fixture(scope="module")
def data_parallel(stack, tmp_path_factory):
    """Two new runners on the stack's loader and a scheduler in front of both."""
    logs = tmp_path_factory.mktemp("dp-logs")
    runner_ports = [free_port(), free_port()]
    scheduler_port = free_port()
    procs = []

    def spawn(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))

    for i, port in enumerate(runner_ports):
        spawn(f"runner{i}", "llmexec.runner", "--host", "127.0.0.1", "--port", str(port), "--loader", stack.loader,
              "--block-size", "4", "--num-blocks", "256", "--threads", "1")
    runners = ",".join(f"127.0.0.1:{p}" for p in runner_ports)
    spawn("scheduler", "llmexec.scheduler", "--host", "127.0.0.1", "--port", str(scheduler_port), "--runner", runners,
          "--loader", stack.loader, "--redis-url", stack.redis_url, "--redis-prefix", "dp", "--max-num-seqs", "2",
          "--max-queue-len", "1", "--metrics-port", "0")
    address = f"127.0.0.1:{scheduler_port}"
    deadline = time.monotonic() + 120
    while check_health(address, "llmexec.v1.SchedulerService") != "SERVING":
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError("\n".join(f"== {f.name}\n{f.read_text()[-2000:]}" for f in logs.iterdir()))
        time.sleep(0.25)
    yield address
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def generate(address: str, prompt: list[int], max_tokens: int) -> list[scheduler_pb2.GenerateResponse]:
    req = scheduler_pb2.GenerateRequest(prompt_token_ids=prompt, sampling_params=sampling_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        return list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(req, timeout=120))


def server_info(address: str) -> scheduler_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return scheduler_pb2_grpc.SchedulerServiceStub(channel).GetServerInfo(scheduler_pb2.GetServerInfoRequest())


def test_data_parallel_spreads_requests_and_routes_by_cached_prefix(data_parallel):
    gen = torch.Generator().manual_seed(3)
    first, second = (torch.randint(0, 300, (40,), generator=gen).tolist() for _ in range(2))
    # Concurrent: the second request finds the first runner busy and goes to the other.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: generate(data_parallel, p, 30), [first, second]))
    info = server_info(data_parallel)
    assert len(info.runners) == 2 and all(r.routed_sequences == 1 for r in info.runners)
    # One at a time (both runners idle): each follow-up must find its prefix, so it
    # must go to the runner that holds it, whichever that is.
    for prefix in (first, second, first):
        replies = generate(data_parallel, prefix + [1, 2, 3], 4)
        assert replies[-1].cached_prompt_tokens == 40
    info = server_info(data_parallel)
    assert sorted(r.routed_sequences for r in info.runners) == [2, 3]
    assert all(r.prefix_cache_hit_tokens >= 40 for r in info.runners)


def test_waiting_queue_limit_refuses_at_once(data_parallel):
    # Two runners x (2 running + 1 waiting): a burst of 12 cannot all be queued.
    def attempt(i: int):
        started = time.monotonic()
        try:
            return len([t for r in generate(data_parallel, [i + 1] * 5, 40) for t in r.token_ids]), None
        except grpc.RpcError as exc:
            return exc.code(), time.monotonic() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(attempt, range(12)))
    refused = [seconds for code, seconds in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [n for n, seconds in results if seconds is None]
    assert refused and served and len(refused) + len(served) == 12
    assert all(n == 40 for n in served)
    assert max(refused) < 2.0  # refused at once, not after waiting


def test_prometheus_metrics(data_parallel):
    shared = list(range(100, 120))
    generate(data_parallel, shared + [1], 3)
    replies = generate(data_parallel, shared + [2], 12)  # finds 20 prompt tokens cached
    info = server_info(data_parallel)
    assert info.metrics_port > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{info.metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)

    def value(prefix: str) -> float:
        matches = [v for k, v in samples.items() if k.startswith(prefix)]
        assert matches, f"{prefix} not exported"
        return sum(matches)

    assert value("vllm:num_requests_running") == 0 and value("vllm:num_requests_waiting") == 0
    assert value("vllm:kv_cache_usage_perc") == 0.0  # idle: every block free (cached ones are evictable)
    completions = value("vllm:request_success_total")
    assert completions >= 2
    assert value("vllm:time_to_first_token_seconds_count") == completions
    assert value("vllm:e2e_request_latency_seconds_count") == completions
    assert value("vllm:inter_token_latency_seconds_count") == value("vllm:generation_tokens_total") - completions
    assert value("vllm:prefix_cache_hits_total") >= 20 and value("vllm:prefix_cache_queries_total") >= 42
    assert value("vllm:prompt_tokens_total") > 0
    assert value("llmexec:runner_healthy") == 2
    assert value("llmexec:kv_slots_allocated_total") > value("llmexec:kv_slots_empty_total") > 0
    assert len(replies) == 12 and 'model_name="' in text
