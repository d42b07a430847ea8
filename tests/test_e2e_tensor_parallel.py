"""`llmexec up --tensor-parallel-size 2` on a tiny Llama (GQA): generation through the scheduler, on two ranks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from stack_fixture import start_stack
from test_e2e_tiny_llama import (
    NEW_TOKENS,
    generate_ids,
    tiny_llama,  # noqa: F401 - the module-scoped checkpoint fixture
)

from llmexec.v1 import loader_pb2, loader_pb2_grpc, runner_pb2, runner_pb2_grpc


@pytest.fixture(scope="module")
def split_stack(tmp_path_factory, tiny_llama):  # noqa: F811
    folder, _ = tiny_llama
    stack = start_stack(tmp_path_factory.mktemp("tp-stack"), str(folder), "--tensor-parallel-size", "2",
                        "--block-size", "4", "--num-blocks", "256")
    yield stack
    stack.down()


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_generation_on_two_ranks_equals_transformers(split_stack, tiny_llama):  # noqa: F811
    _, model = tiny_llama
    runner_pid = split_stack.records["runner"]["pid"]
    [worker] = children_of(runner_pid)  # rank 1: a process of its own
    assert "llmexec.runner.tp_worker" in Path(f"/proc/{worker}/cmdline").read_text()

    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (4, 23, 11, 1)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate_ids(split_stack.scheduler, p), prompts))
    for prompt, got in zip(prompts, results):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == out[0, len(prompt):].tolist()

    with grpc.insecure_channel(split_stack.runner) as channel:
        runner = runner_pb2_grpc.RunnerServiceStub(channel)
        info = runner.GetRunnerInfo(runner_pb2.GetRunnerInfoRequest())
        with pytest.raises(grpc.RpcError) as refused:
            runner.TraceStep(runner_pb2.TraceStepRequest(prompt_token_ids=[1, 2, 3]))
    assert info.model_info.tensor_parallel_size == 2
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with grpc.insecure_channel(split_stack.loader) as channel:
        loader = loader_pb2_grpc.LoaderServiceStub(channel)
        shards = [loader.GetWeightLayout(loader_pb2.GetWeightLayoutRequest(tensor_parallel_rank=r)) for r in (0, 1)]
        with pytest.raises(grpc.RpcError) as out_of_range:
            loader.GetWeightLayout(loader_pb2.GetWeightLayoutRequest(tensor_parallel_rank=2))
    assert out_of_range.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert shards[0].segments[0].path != shards[1].segments[0].path  # one shared-memory file per rank
    sizes = [{t.name: list(t.shape) for t in shard.tensors} for shard in shards]
    assert sizes[0] == sizes[1]
    assert sizes[0]["model.layers.0.self_attn.qkv_proj.weight"] == [(2 + 1 + 1) * 16, 64]  # 2 q heads, 1 k, 1 v

    split_stack.down()  # rank 0 stops its worker on the way out
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]


def test_a_size_that_does_not_divide_the_heads_is_refused_before_anything_starts(tmp_path, tiny_llama):  # noqa: F811
    from stack_fixture import Stack

    folder, _ = tiny_llama
    result = Stack(home=tmp_path, records={}).cli("up", "--detach", "--model", str(folder),
                                                  "--tensor-parallel-size", "3", timeout=120)
    assert result.returncode != 0
    assert "tensor parallel size 3 does not divide the 4 attention heads; use one of 1, 2, 4" in result.stderr
    assert not (tmp_path / "stack.json").exists()
