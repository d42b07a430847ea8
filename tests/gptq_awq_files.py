"""GPTQ and AWQ checkpoints for tests, packed as AutoGPTQ's QuantLinear.pack and AutoAWQ's
WQLinear_GEMM.from_linear pack them, with reference dequantizers that read those layouts
one element at a time (numpy, integer arithmetic), independent of llmexec.quantization.

No GPTQ/AWQ library installs on a CPU-only machine without CUDA builds, so the
published layouts are reproduced here from the libraries' packing loops.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import torch
from safetensors.torch import save_file

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_rtn(weight: torch.Tensor, group_size: int, g_idx: np.ndarray, rng: np.random.Generator):
    """Asymmetric 4-bit: per-group fp16 scale and integer zero. Returns int codes [in, out], zeros
    [groups, out], scales fp16 [groups, out] (GPTQ's orientation: rows are input columns)."""
    w = weight.double().numpy().T  # [in, out]
    groups = int(g_idx.max()) + 1
    scales = np.empty((groups, w.shape[1]), np.float16)
    zeros = rng.integers(4, 12, size=(groups, w.shape[1]))
    for g in range(groups):
        rows = w[g_idx == g]
        spread = np.maximum(np.abs(rows).max(axis=0), 1e-3)
        scales[g] = (spread / 7).astype(np.float16)
    codes = np.clip(np.round(w / scales[g_idx].astype(np.float64) + zeros[g_idx]), 0, 15).astype(np.int64)
    return codes, zeros, scales


def pack_gptq(codes: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """QuantLinear.pack (format "gptq"): qweight [in/8, out], qzeros [groups, out/8] holding zero - 1."""
    qweight = np.zeros((codes.shape[0] // 8, codes.shape[1]), np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(8):
            qweight[row] |= codes[row * 8 + j].astype(np.uint32) << (4 * j)
    stored = (zeros - 1).astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(8):
            qzeros[:, col] |= stored[:, col * 8 + j] << (4 * j)
    return qweight.view(np.int32), qzeros.view(np.int32)


def pack_awq(codes: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WQLinear_GEMM.from_linear: qweight [in, out/8], qzeros [groups, out/8], nibble i = column 8c + ORDER[i]."""
    def pack(values):
        packed = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
        for col in range(packed.shape[1]):
            for i in range(8):
                packed[:, col] |= values[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << (i * 4)
        return packed.view(np.int32)

    return pack(codes), pack(zeros)


def _nibble(word: int, k: int) -> int:
    return (int(np.uint32(np.int32(word))) >> (4 * k)) & 0xF


def reference_gptq(qweight, qzeros, scales, g_idx) -> np.ndarray:
    """w[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + 1)), one element at a time; float32 [out, in]."""
    qweight, qzeros, scales, g_idx = (t.numpy() for t in (qweight, qzeros, scales, g_idx))
    rows, out = qweight.shape[0] * 8, qweight.shape[1]
    w = np.empty((out, rows), np.float32)
    for i in range(rows):
        g = int(g_idx[i])
        for o in range(out):
            q = _nibble(qweight[i // 8, o], i % 8)
            z = _nibble(qzeros[g, o // 8], o % 8) + 1
            w[o, i] = np.float32(scales[g, o]) * np.float32(q - z)
    return w


def reference_awq(qweight, qzeros, scales, group_size) -> np.ndarray:
    """w[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g = i // group_size; float32 [out, in]."""
    qweight, qzeros, scales = (t.numpy() for t in (qweight, qzeros, scales))
    rows, out = qweight.shape[0], qweight.shape[1] * 8
    w = np.empty((out, rows), np.float32)
    for i in range(rows):
        g = i // group_size
        for o in range(out):
            nibble = AWQ_ORDER.index(o % 8)
            q = _nibble(qweight[i, o // 8], nibble)
            z = _nibble(qzeros[g, o // 8], nibble)
            w[o, i] = np.float32(scales[g, o]) * np.float32(q - z)
    return w


def write_quantized_llama(model, folder, method: str, group_size: int = 32, act_order: bool = False, seed: int = 0):
    """Save `model` (a tiny HF Llama) as a GPTQ or AWQ checkpoint; returns HF name -> reference
    dequantized float32 weight of every linear (what the checkpoint means)."""
    rng = np.random.default_rng(seed)
    config = model.config.to_dict()
    tensors, dequantized = {}, {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.split(".", 3)[-1] in LINEARS):
            tensors[name] = tensor.contiguous()
            continue
        in_features = tensor.shape[1]
        g_idx = np.arange(in_features) // group_size
        if act_order:  # one permutation per input: q/k/v (and gate/up) share theirs, as in GPTQ
            shared = module.rsplit(".", 1)[0] + {"o_proj": ".o", "down_proj": ".down"}.get(module.rsplit(".", 1)[1], "")
            perm = np.random.default_rng(zlib.crc32(shared.encode())).permutation(in_features)
            g_idx = np.empty(in_features, np.int64)
            g_idx[perm] = np.arange(in_features) // group_size
        codes, zeros, scales = quantize_rtn(tensor, group_size, g_idx, rng)
        if method == "gptq":
            qweight, qzeros = pack_gptq(codes, zeros)
            tensors[f"{module}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:
            qweight, qzeros = pack_awq(codes, zeros)
        tensors[f"{module}.qweight"] = torch.from_numpy(qweight)
        tensors[f"{module}.qzeros"] = torch.from_numpy(qzeros)
        tensors[f"{module}.scales"] = torch.from_numpy(scales)
        if method == "gptq":
            dequantized[name] = reference_gptq(tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"],
                                               tensors[f"{module}.scales"], tensors[f"{module}.g_idx"])
        else:
            dequantized[name] = reference_awq(tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"],
                                              tensors[f"{module}.scales"], group_size)
    if method == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                         "desc_act": act_order, "sym": False, "checkpoint_format": "gptq"}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "zero_point": True, "version": "gemm"}
    config["architectures"] = ["LlamaForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return {name: torch.from_numpy(w) for name, w in dequantized.items()}
