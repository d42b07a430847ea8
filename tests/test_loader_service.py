"""The loader as a user meets it: a real `python -m llmexec.loader` process, called over gRPC.

Bad checkpoints (truncated, missing tensor, wrong shape, unknown dtype,
pickles, uncached model ids) are refused with a message naming the file and
tensor, and the same process then loads good ones in every format.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
import pytest
import torch
from checkpoint_files import put_in_hf_cache, save_torch_bin
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

from llmexec.rpc.client import check_health
from llmexec.v1 import loader_pb2, loader_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    model = tiny_llama()
    model.save_pretrained(root / "good")
    save_torch_bin(model, root / "bin", num_shards=2)
    put_in_hf_cache(root / "good", root / "hf", "acme/tiny")
    return root, model


@dataclass
class Loader:
    address: str
    stub: loader_pb2_grpc.LoaderServiceStub


@pytest.fixture(scope="module")
def loader(checkpoints):
    """A loader started with --model and --load-format, as `llmexec up` starts it."""
    root, _ = checkpoints
    port = free_port()
    env = {**os.environ, "HF_HOME": str(root / "hf"), "LLMEXEC_LOG_LEVEL": "WARNING"}
    env.pop("HF_HUB_CACHE", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "llmexec.loader", "--port", str(port), "--model", str(root / "bin"),
         "--load-format", "pt"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while check_health(address, "llmexec.v1.LoaderService") != "SERVING":
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "loader did not serve within 120 s"
        time.sleep(0.2)
    channel = grpc.insecure_channel(address)
    yield Loader(address, loader_pb2_grpc.LoaderServiceStub(channel))
    channel.close()
    process.terminate()
    process.wait(timeout=30)


def load(loader: Loader, model: str, load_format: str = "") -> loader_pb2.ModelInfo:
    return loader.stub.LoadModel(loader_pb2.LoadModelRequest(model=model, load_format=load_format), timeout=120).model_info


def rewrite_header(path, edit) -> None:
    """Apply `edit` to a safetensors file's JSON header, keeping the data as it is."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])


def broken_copy(root, name, damage):
    folder = root / name
    shutil.copytree(root / "good", folder)
    damage(folder / "model.safetensors")
    return folder


def truncate(path):
    os.truncate(path, path.stat().st_size - 1000)


def drop_norm(path):
    tensors = load_file(path)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})


def widen_down_proj(path):
    tensors = load_file(path)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 130)
    save_file(tensors, path, metadata={"format": "pt"})


def unknown_dtype(path):
    def edit(header):
        header["model.layers.0.self_attn.o_proj.weight"]["dtype"] = "F4"

    rewrite_header(path, edit)


BAD = {
    "truncated": (truncate, grpc.StatusCode.FAILED_PRECONDITION, ["model.safetensors", "truncated"]),
    # In no file, so the message names the checkpoint folder.
    "missing tensor": (drop_norm, grpc.StatusCode.FAILED_PRECONDITION,
                       ["model.layers.1.post_attention_layernorm.weight", "missing"]),
    "wrong shape": (widen_down_proj, grpc.StatusCode.FAILED_PRECONDITION,
                    ["model.safetensors", "model.layers.0.mlp.down_proj.weight", "[64, 130]"]),
    "unknown dtype": (unknown_dtype, grpc.StatusCode.FAILED_PRECONDITION,
                      ["model.safetensors", "model.layers.0.self_attn.o_proj.weight", "'F4'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_refused_naming_file_and_tensor_then_a_good_one_loads(loader, checkpoints, case):
    root, _ = checkpoints
    damage, code, words = BAD[case]
    folder = broken_copy(root, case.replace(" ", "-"), damage)
    with pytest.raises(grpc.RpcError) as error:
        load(loader, str(folder))
    assert error.value.code() == code
    for word in [str(folder), *words]:
        assert word in error.value.details(), (word, error.value.details())
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"llmexec-{folder.name}-")]
    info = load(loader, str(root / "good"))
    assert info.load_format == "safetensors" and info.parameter_count == sum(
        t.numel() for t in checkpoints[1].state_dict().values()
    )


def test_the_model_given_at_start_was_loaded_with_its_load_format(loader, checkpoints):
    info = loader.stub.GetModelInfo(loader_pb2.GetModelInfoRequest()).model_info
    assert (info.model_id, info.load_format) == ("bin", "pt")


def test_model_id_from_the_hf_cache_and_missing_id_not_found(loader, checkpoints):
    info = load(loader, "acme/tiny")
    assert info.model_id == "tiny" and "models--acme--tiny/snapshots" in info.source
    with pytest.raises(grpc.RpcError) as error:
        load(loader, "acme/not-downloaded")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "models--acme--not-downloaded" in error.value.details() and "never downloads" in error.value.details()


def test_dummy_and_unknown_formats(loader, checkpoints):
    root, model = checkpoints
    info = load(loader, str(root / "good" / "config.json"), "dummy")
    assert info.load_format == "dummy" and info.parameter_count == sum(t.numel() for t in model.state_dict().values())
    with pytest.raises(grpc.RpcError) as error:
        load(loader, str(root / "good"), "npcache")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dummy" in error.value.details()


def test_inspect_model_rpc_and_cli_through_the_loader(loader, checkpoints):
    root, model = checkpoints
    request = loader_pb2.InspectModelRequest(model=str(root / "bin"), memory_bytes=10**7, kv_cache_dtype="float32")
    reply = loader.stub.InspectModel(request, timeout=120)
    assert (reply.load_format, reply.parameter_source) == ("pt", "checkpoint")
    assert reply.parameter_count == sum(p.numel() for p in model.parameters())
    config = model.config
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert reply.kv_cache_bytes_per_token == kv_per_token
    float32 = next(row for row in reply.footprints if row.precision == "float32")
    assert float32.kv_cache_tokens == (10**7 - 4 * reply.parameter_count) // kv_per_token

    result = subprocess.run(
        [sys.executable, "-m", "llmexec", "inspect", str(root / "bin"), "--loader", loader.address,
         "--memory", "10MB", "--kv-cache-dtype", "float32"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"parameters: {reply.parameter_count:,}" in result.stdout
    assert f"{float32.kv_cache_tokens:,}" in result.stdout

    with pytest.raises(grpc.RpcError) as error:
        loader.stub.InspectModel(loader_pb2.InspectModelRequest(model="acme/never-cached"), timeout=60)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_quantized_load_over_grpc_reports_its_scheme_and_bytes(loader, checkpoints):
    root, model = checkpoints
    request = loader_pb2.LoadModelRequest(model=str(root / "good"), quantization="int4", quantization_group_size=32)
    info = loader.stub.LoadModel(request, timeout=120).model_info
    assert info.quantization == "int4" and info.parameter_count == sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for n, p in model.named_parameters() if "_proj" in n)
    assert info.bytes_by_dtype["uint8"] == linear // 2
    assert info.bytes_by_dtype["float32"] < 4 * (info.parameter_count - linear) + 4 * linear // 8
    with pytest.raises(grpc.RpcError) as error:
        loader.stub.LoadModel(loader_pb2.LoadModelRequest(model=str(root / "good"), quantization="gguf"), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not GGUF" in error.value.details()


def test_llmexec_up_passes_load_format_and_quantization_to_the_loader():
    import argparse

    from llmexec.cli.main import add_up_parser
    from llmexec.cli.stack import service_argv

    parser = argparse.ArgumentParser()
    add_up_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["up", "--model", "acme/tiny", "--load-format", "pt", "--quantization", "int4",
                              "--quantization-group-size", "64"])
    joined = " ".join(service_argv("loader", 1234, {}, vars(args)))
    assert "--model acme/tiny" in joined and "--load-format pt" in joined
    assert "--quantization int4" in joined and "--quantization-group-size 64" in joined
