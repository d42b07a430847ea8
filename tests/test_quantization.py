"""Weight quantization, end to end: checkpoint -> loader (quantized components in shared memory)
-> runner (quantized linear modules) -> logits.

The exact check for every scheme: our runner on the quantized weights gives the
same prefill and decode logits as transformers running the weights those
components describe. For GGUF blocks and GPTQ/AWQ those "described weights" come
from independent dequantizers (gguf's, and the reference readers of
tests/gptq_awq_files.py), so any packing mistake shows.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from checkpoint_files import write_llama_gguf
from gptq_awq_files import write_quantized_llama
from paged_harness import (
    NUM_BLOCKS,
    Sequence,
    check_prefill_then_decode,
    hf_reference,
    make_step,
    random_prompt,
    shuffled_blocks,
)
from tiny_models import TINY_LLAMA, tiny_llama

from llmexec.errors import InvalidArgumentError
from llmexec.loader.model_store import ModelStore
from llmexec.quantization import CODES, G_IDX, OFFSET, SCALE
from llmexec.quantization.fp8 import Fp8Linear, quantize_fp8
from llmexec.quantization.gguf_q4 import gguf_q4_components
from llmexec.quantization.int4 import Int4Linear, dequantize_int4, pack_nibbles, quantize_int4, unpack_nibbles
from llmexec.quantization.int8 import Int8Linear, quantize_int8
from llmexec.runner.model_runner import ModelRunner
from llmexec.runner.weight_attach import attach_weights

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")


# --- the formats, on their own ---------------------------------------------------------


def test_nibbles_pack_two_per_byte_low_first():
    codes = torch.randint(0, 16, (3, 7), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 4) and packed.dtype == torch.uint8
    assert int(packed[1, 0]) == int(codes[1, 0]) | int(codes[1, 1]) << 4
    assert torch.equal(unpack_nibbles(packed, 7), codes)


@pytest.mark.parametrize("in_features, group_size", [(256, 128), (96, 32), (200, 64)])
def test_int4_error_is_at_most_half_a_step_per_group(in_features, group_size):
    weight = torch.randn(24, in_features) * torch.linspace(0.1, 3, in_features)
    parts = quantize_int4(weight, group_size)
    groups = -(-in_features // group_size)
    assert parts[CODES].shape == (24, in_features // 2) and parts[SCALE].shape == (24, groups)
    assert (G_IDX in parts) == bool(in_features % group_size)  # a short last group needs g_idx
    restored = dequantize_int4(parts[CODES], parts[SCALE], parts[OFFSET], in_features, parts.get(G_IDX))
    step = parts[SCALE].float().repeat_interleave(group_size, dim=1)[:, :in_features]
    assert ((restored - weight).abs() <= step / 2 + 1e-3 * weight.abs().amax()).all()


def test_int8_and_fp8_are_per_output_channel():
    weight = torch.randn(32, 48) * torch.linspace(0.01, 10, 32)[:, None]  # rows of very different size
    int8 = quantize_int8(weight)
    assert int8[CODES].dtype == torch.int8 and int8[SCALE].shape == (32,)
    assert ((int8[CODES].float() * int8[SCALE][:, None] - weight).abs() <= int8[SCALE][:, None] / 2 + 1e-6).all()
    fp8 = quantize_fp8(weight)
    assert fp8[CODES].dtype == torch.float8_e4m3fn
    relative = (fp8[CODES].float() * fp8[SCALE][:, None] - weight).abs() / weight.abs().amax(1, keepdim=True)
    assert relative.max() < 2**-4  # e4m3: 3 mantissa bits


def test_quantized_linears_equal_a_linear_over_their_described_weight():
    x = torch.randn(5, 40)
    weight, bias = torch.randn(24, 40), torch.nn.Parameter(torch.randn(24), requires_grad=False)
    int8 = quantize_int8(weight)
    expected = torch.nn.functional.linear(x, int8[CODES].float() * int8[SCALE][:, None], bias)
    torch.testing.assert_close(Int8Linear(40, 24, int8, bias)(x), expected)
    int4 = quantize_int4(weight, 16)
    described = dequantize_int4(int4[CODES], int4[SCALE], int4[OFFSET], 40, int4.get(G_IDX))
    torch.testing.assert_close(Int4Linear(40, 24, int4, bias)(x), torch.nn.functional.linear(x, described, bias))
    fp8 = quantize_fp8(weight)
    expected = torch.nn.functional.linear(x, fp8[CODES].float() * fp8[SCALE][:, None], bias)
    torch.testing.assert_close(Fp8Linear(40, 24, fp8, bias)(x), expected)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_become_int4_bit_for_bit(qtype):
    import gguf  # here, so the GPU machine (no gguf) can run the rest of this module

    weight = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[qtype])
    parts = gguf_q4_components(raw, qtype, 96)
    ours = dequantize_int4(parts[CODES], parts[SCALE], parts[OFFSET], 96)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])))
    # Q4_1's bytes exactly; Q4_0 gains its implicit offset (-8d) as 2 bytes a block.
    extra = 2 * parts[SCALE].numel() if qtype == "Q4_0" else 0
    assert parts[CODES].numel() + 2 * (parts[SCALE].numel() + parts[OFFSET].numel()) == raw.size + extra


# --- through the loader and the runner ------------------------------------------------


@pytest.fixture
def store():
    store = ModelStore()
    yield store
    store.close()


def runner_for(store, path, **load) -> tuple[ModelRunner, object]:
    model = store.load(str(path), **load)
    runner = ModelRunner(model.config, attach_weights(model.weights.layout), num_blocks=NUM_BLOCKS, block_size=16)
    return runner, model


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    return runner.execute_logits(make_step([Sequence(ids, shuffled_blocks(), runner.block_size).chunk()]))[0]


def described_model(reference: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' model with these linear weights: what the quantized checkpoint means."""
    model = copy.deepcopy(reference)
    state = model.state_dict()
    for name, weight in weights.items():
        state[name].copy_(weight)
    return model


def described_weights(runner: ModelRunner, hf_names: list[str]) -> dict[str, torch.Tensor]:
    """Each HF linear's weight as the runner's quantized modules describe it (fused rows split back)."""
    described = {}
    for layer_index, layer in enumerate(runner.model.model.layers):
        for fused, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("self_attn.o_proj", ("o_proj",)),
                             ("mlp.down_proj", ("down_proj",))):
            module = layer.get_submodule(fused)
            weight = module(torch.eye(module.in_features)).T  # [out, in], bias-free linears
            prefix = f"model.layers.{layer_index}.{fused.split('.')[0]}"
            rows = layer.self_attn.qkv_sizes if len(parts) == 3 else [weight.shape[0] // len(parts)] * len(parts)
            for part, chunk in zip(parts, weight.split(rows)):
                described[f"{prefix}.{part}.weight"] = chunk
    assert set(described) == set(hf_names)
    return described


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_round_to_nearest_schemes_run_what_they_store(scheme, tmp_path, store):
    reference = tiny_llama()
    reference.save_pretrained(tmp_path)
    runner, model = runner_for(store, tmp_path, quantization=scheme, quantization_group_size=32)
    assert model.quantization == scheme
    assert model.parameter_count == sum(p.numel() for p in reference.parameters())
    codes_dtype = {"int8": "int8", "int4": "uint8", "fp8": "float8_e4m3fn"}[scheme]
    linear_params = sum(p.numel() for n, p in reference.named_parameters() if n.endswith(LINEAR_SUFFIXES))
    assert model.weights.bytes_by_dtype[codes_dtype] == linear_params // (2 if scheme == "int4" else 1)
    layer = runner.model.model.layers[0]
    assert type(layer.self_attn.qkv_proj).__name__ == {"int8": "Int8Linear", "int4": "Int4Linear", "fp8": "Fp8Linear"}[scheme]
    assert runner.model.lm_head.weight.dtype == torch.float32  # the head stays full precision
    # Zero copies: the codes the runner computes with lie in the loader's shared-memory segment.
    segment = model.weights.tensors[f"model.layers.0.mlp.gate_up_proj.{CODES}"]
    assert torch.equal(layer.mlp.gate_up_proj.codes, segment)
    assert layer.mlp.gate_up_proj.codes.untyped_storage().nbytes() == model.weights.layout.segments[0].size_bytes

    hf_names = [n for n in reference.state_dict() if n.endswith(LINEAR_SUFFIXES)]
    described = described_model(reference, described_weights(runner, hf_names))
    check_prefill_then_decode(runner, hf_reference(described), random_prompt(10, 3, TINY_LLAMA["vocab_size"]), steps=6)


GGUF_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_blocks_stay_4_bit_and_give_the_dequantized_logits_exactly(qtype, tmp_path, store):
    state_dict = tiny_llama(**GGUF_LLAMA).state_dict()
    write_llama_gguf(tmp_path / "m.gguf", GGUF_LLAMA, state_dict, qtype)
    dequantized, float_model = runner_for(store, tmp_path / "m.gguf")
    kept, kept_model = runner_for(store, tmp_path / "m.gguf", quantization="gguf")
    assert float_model.quantization == "none" and kept_model.quantization == "gguf"
    assert kept_model.weights.bytes_by_dtype["uint8"] * 2 == sum(
        t.numel() for n, t in state_dict.items() if n.endswith(LINEAR_SUFFIXES)
    )
    assert isinstance(kept.model.model.layers[1].self_attn.qkv_proj, Int4Linear)
    prompt = random_prompt(12, 5, GGUF_LLAMA["vocab_size"])
    # The reference: the gguf-dequantized float model, run by our runner from scratch each step.
    check_prefill_then_decode(kept, lambda ids: prefill_logits(dequantized, ids), prompt, steps=4)
    assert torch.equal(prefill_logits(kept, prompt), prefill_logits(dequantized, prompt))  # no second rounding


@pytest.mark.parametrize("method, act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_gptq_and_awq_checkpoints_run_as_their_reference_dequantization(method, act_order, tmp_path, store):
    reference = tiny_llama()
    meant = write_quantized_llama(reference, tmp_path, method, group_size=32, act_order=act_order)
    runner, model = runner_for(store, tmp_path)  # the checkpoint's own quantization, from its config
    assert model.quantization == method
    assert "int32" not in model.weights.bytes_by_dtype or act_order  # packed int32 words are gone; g_idx stays
    ours = described_weights(runner, list(meant))
    for name, weight in meant.items():
        torch.testing.assert_close(ours[name], weight, rtol=1e-6, atol=1e-6, msg=name)
    check_prefill_then_decode(runner, hf_reference(described_model(reference, meant)),
                              random_prompt(10, 4, TINY_LLAMA["vocab_size"]), steps=6)


def test_contradicting_or_unknown_quantization_is_invalid(tmp_path, store):
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(InvalidArgumentError, match="not GGUF"):
        store.load(str(tmp_path / "plain"), quantization="gguf")
    with pytest.raises(InvalidArgumentError, match="unknown quantization"):
        store.load(str(tmp_path / "plain"), quantization="int3")
    write_quantized_llama(tiny_llama(), tmp_path / "gptq", "gptq")
    with pytest.raises(InvalidArgumentError, match="already quantized with 'gptq'"):
        store.load(str(tmp_path / "gptq"), quantization="int8")


# --- FP8 on the GPU -------------------------------------------------------------------------

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 matmuls need a CUDA GPU of compute capability >= 8.9 (Ada/Hopper); run on the H200",
)


@needs_fp8_gpu
def test_fp8_linear_runs_fp8_matmuls_on_the_gpu():
    from llmexec.quantization.fp8 import fp8_matmul_supported

    torch.manual_seed(0)
    weight = torch.randn(256, 512, device="cuda")
    parts = {k: v.cuda() for k, v in quantize_fp8(weight).items()}
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    assert fp8_matmul_supported(x, parts[CODES])
    out = Fp8Linear(512, 256, parts, None)(x)
    described = parts[CODES].float() * parts[SCALE][:, None]
    expected = x.float() @ described.T
    assert out.dtype == torch.bfloat16
    # The activations are rounded to e4m3 too: a few percent of the output's scale.
    assert (out.float() - expected).abs().max() < 0.06 * expected.abs().max()
    assert (x.float() @ weight.T - out.float()).abs().max() < 0.08 * expected.abs().max()


@needs_fp8_gpu
def test_fp8_model_on_the_gpu_stays_close_to_float(tmp_path, store):
    reference = tiny_llama()
    reference.save_pretrained(tmp_path)
    model = store.load(str(tmp_path), dtype="bfloat16", quantization="fp8")
    runner = ModelRunner(model.config, attach_weights(model.weights.layout), num_blocks=NUM_BLOCKS, block_size=16,
                         device="cuda")
    assert runner.model.model.layers[0].self_attn.qkv_proj.codes.is_cuda
    prompt = random_prompt(16, 7, TINY_LLAMA["vocab_size"])
    logits = prefill_logits(runner, prompt).cpu()
    expected = hf_reference(reference)(prompt)
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
