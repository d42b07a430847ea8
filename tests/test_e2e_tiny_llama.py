"""A tiny random Llama with grouped-query attention, saved as sharded safetensors, served end to end."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from stack_fixture import start_stack

from llmexec.v1 import loader_pb2, loader_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, eos_token_id=None,
                         bos_token_id=None, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    return folder, model


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory, tiny_llama):
    folder, _ = tiny_llama
    stack = start_stack(tmp_path_factory.mktemp("tiny-stack"), str(folder), "--block-size", "4", "--num-blocks", "256")
    yield stack
    stack.down()


def generate_ids(address: str, prompt_ids: list[int]) -> list[int]:
    request = scheduler_pb2.GenerateRequest(
        prompt_token_ids=prompt_ids, sampling_params=sampling_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    )
    with grpc.insecure_channel(address) as channel:
        replies = list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, timeout=300))
    assert all(r.text == "" for r in replies)  # no tokenizer, no text
    return [t for r in replies for t in r.token_ids]


def test_concurrent_greedy_token_ids_equal_transformers(tiny_stack, tiny_llama):
    _, model = tiny_llama
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (3, 17, 9, 40, 1, 25)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate_ids(tiny_stack.scheduler, p), prompts))
    for prompt, got in zip(prompts, results):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == out[0, len(prompt):].tolist()
    # The decodes ran with async scheduling: steps planned while the one before ran.
    with grpc.insecure_channel(tiny_stack.scheduler) as channel:
        info = scheduler_pb2_grpc.SchedulerServiceStub(channel).GetServerInfo(scheduler_pb2.GetServerInfoRequest())
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{info.metrics_port}/metrics", timeout=10).read().decode()
    planned_ahead = [line for line in metrics.splitlines() if line.startswith("llmexec:steps_planned_ahead_total")]
    # Each request arriving mid-run costs one synchronous step (it is admitted); most steps go ahead.
    assert planned_ahead and float(planned_ahead[0].split()[-1]) >= NEW_TOKENS // 2


def test_model_info_rpc(tiny_stack, tiny_llama):
    _, model = tiny_llama
    with grpc.insecure_channel(tiny_stack.loader) as channel:
        info = loader_pb2_grpc.LoaderServiceStub(channel).GetModelInfo(loader_pb2.GetModelInfoRequest()).model_info
    assert info.architecture == "LlamaForCausalLM"
    assert info.parameter_count == sum(p.numel() for p in model.parameters())
    assert info.bytes_by_dtype["float32"] == info.parameter_count * 4
    assert json.loads(info.config_json)["num_key_value_heads"] == 2
    assert info.load_format == "safetensors"
    assert not info.has_tokenizer
    with grpc.insecure_channel(tiny_stack.loader) as channel, pytest.raises(grpc.RpcError) as err:
        loader_pb2_grpc.LoaderServiceStub(channel).GetModelInfo(loader_pb2.GetModelInfoRequest(model_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_text_prompt_without_tokenizer_is_refused(tiny_stack):
    request = scheduler_pb2.GenerateRequest(prompt="hello")
    with grpc.insecure_channel(tiny_stack.scheduler) as channel, pytest.raises(grpc.RpcError) as err:
        list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_token_ids" in err.value.details()


def test_cli_status_and_up_again_restarts_only_what_died(tiny_stack, tiny_llama):
    folder, _ = tiny_llama
    status = tiny_stack.cli("status")
    assert status.returncode == 0
    for name in ("redis", "loader", "runner", "scheduler"):
        line = next(l for l in status.stdout.splitlines() if l.startswith(name))
        assert "SERVING" in line and str(tiny_stack.records[name]["pid"]) in line
    old = dict(tiny_stack.records)
    os.kill(old["scheduler"]["pid"], signal.SIGKILL)
    again = tiny_stack.cli("up", "--detach", "--model", str(folder), "--scheduler-port", "0", "--loader-port", "0",
                           "--runner-port", "0", "--block-size", "4", "--num-blocks", "256")
    assert again.returncode == 0, again.stderr
    records = json.loads((tiny_stack.home / "stack.json").read_text())
    for name in ("redis", "loader", "runner"):
        assert records[name]["pid"] == old[name]["pid"], name
    assert records["scheduler"]["pid"] != old["scheduler"]["pid"]
    tiny_stack.records = records
    assert len(generate_ids(tiny_stack.scheduler, [5, 6, 7])) == NEW_TOKENS
