"""Writing checkpoints in the formats the loader reads, for tests: PyTorch .bin (single and
sharded, as transformers 4.x wrote them), GGUF of a Llama in any tensor type, and the
Hugging Face cache layout. Plus independent numpy dequantizers for GGUF blocks, written
from ggml's block definitions (ggml-common.h / ggml-quants.c), not from the gguf package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

# --- PyTorch .bin -------------------------------------------------------------


def save_torch_bin(model, folder: Path, num_shards: int = 1) -> None:
    """`save_pretrained(safe_serialization=False)` as transformers 4.x did it (5.x writes
    only safetensors): config.json, then pytorch_model.bin or N shards plus their index."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(folder / "config.json")
    state_dict = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    if num_shards == 1:
        torch.save(state_dict, folder / "pytorch_model.bin")
        return
    names = list(state_dict)
    weight_map = {}
    for shard in range(num_shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = names[shard::num_shards]
        torch.save({name: state_dict[name] for name in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


# --- Hugging Face cache -------------------------------------------------------


def put_in_hf_cache(folder: Path, hf_home: Path, repo_id: str, commit: str = "0123abcd" * 5) -> Path:
    """Lay `folder`'s files out as huggingface_hub does: blobs, a snapshot of links, refs/main."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(folder.iterdir())):
        blob = repo_dir / "blobs" / f"blob{index:04d}"
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


# --- GGUF ---------------------------------------------------------------------

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{_GGUF_LAYER[module]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K row order: each head's rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# Block sizes (values, bytes) and where each K-quant block keeps its fp16 super-scales
# (random bytes there could be inf/NaN; everything else may be any bits).
K_QUANT_BLOCKS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)),
                  "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def random_k_quant_bytes(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of a K-quant type: uint8 [rows, cols / 256 * block bytes]."""
    block_bytes, scale_offsets = K_QUANT_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(1e-3, 2e-2, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_llama_gguf(path: Path, config: dict, state_dict: dict, qtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A GGUF of a Llama with every matrix stored as `qtype` (norms stay F32, as llama.cpp keeps them).

    Simple types are quantized from the state dict with gguf.quants.quantize; K-quants
    (which the gguf package cannot quantize) get random valid blocks. Returns GGUF name ->
    the raw array written, for an independent dequantization.
    """
    import gguf

    qtype_enum = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config["vocab_size"])
    written = {}
    for hf_name, tensor in state_dict.items():
        values = tensor.float().numpy()
        if ".q_proj." in hf_name:
            values = llama_cpp_permute(values, config["num_attention_heads"])
        elif ".k_proj." in hf_name:
            values = llama_cpp_permute(values, config["num_key_value_heads"])
        name = gguf_name(hf_name)
        if values.ndim == 1 or qtype == "F32":
            raw = np.ascontiguousarray(values, dtype=np.float32)
            writer.add_tensor(name, raw)
        elif qtype == "F16":
            raw = values.astype(np.float16)
            writer.add_tensor(name, raw)
        elif qtype in K_QUANT_BLOCKS:
            raw = random_k_quant_bytes(*values.shape, qtype, rng)
            writer.add_tensor(name, raw, raw_dtype=qtype_enum)
        else:
            raw = gguf.quants.quantize(values, qtype_enum)
            writer.add_tensor(name, raw, raw_dtype=qtype_enum)
        written[name] = raw
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


# --- Independent GGUF dequantizers (numpy, float32) ----------------------------


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)  # [n, 1]


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: 6-bit scales and mins packed in 12 bytes -> [n, 8] each."""
    q = scales.astype(np.int32)
    sc = np.empty((q.shape[0], 8), np.int32)
    mn = np.empty((q.shape[0], 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = q[:, j] & 63, q[:, j + 4] & 63
        else:
            sc[:, j] = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
            mn[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _q4_0(b):
    qs = b[:, 2:18].astype(np.int32)
    return _f16(b, 0) * (np.concatenate([qs & 0xF, qs >> 4], axis=1) - 8).astype(np.float32)


def _q4_1(b):
    qs = b[:, 4:20].astype(np.int32)
    return _f16(b, 0) * np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32) + _f16(b, 2)


def _q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].astype(np.int32)
    out = []
    for j in range(4):  # 64 values: low nibbles of 32 bytes (sub-block 2j), then high nibbles (2j+1)
        chunk = qs[:, 32 * j : 32 * j + 32]
        out.append(d * sc[:, 2 * j : 2 * j + 1] * (chunk & 0xF) - dmin * mn[:, 2 * j : 2 * j + 1])
        out.append(d * sc[:, 2 * j + 1 : 2 * j + 2] * (chunk >> 4) - dmin * mn[:, 2 * j + 1 : 2 * j + 2])
    return np.concatenate(out, axis=1)


def _q5_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48].astype(np.int32)
    qs = b[:, 48:176].astype(np.int32)
    out = []
    for j in range(4):
        chunk = qs[:, 32 * j : 32 * j + 32]
        low = (chunk & 0xF) + ((qh >> (2 * j)) & 1) * 16
        high = (chunk >> 4) + ((qh >> (2 * j + 1)) & 1) * 16
        out.append(d * sc[:, 2 * j : 2 * j + 1] * low - dmin * mn[:, 2 * j : 2 * j + 1])
        out.append(d * sc[:, 2 * j + 1 : 2 * j + 2] * high - dmin * mn[:, 2 * j + 1 : 2 * j + 2])
    return np.concatenate(out, axis=1)


def _q6_k(b):
    ql = b[:, 0:128].astype(np.int32)
    qh = b[:, 128:192].astype(np.int32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b, 208)
    out = np.empty((b.shape[0], 256), np.float32)
    for half in range(2):  # 128 values each
        l_lo, l_hi, h = ql[:, 64 * half : 64 * half + 32], ql[:, 64 * half + 32 : 64 * half + 64], qh[:, 32 * half : 32 * half + 32]
        quads = [
            (l_lo & 0xF) | (((h >> 0) & 3) << 4),
            (l_hi & 0xF) | (((h >> 2) & 3) << 4),
            (l_lo >> 4) | (((h >> 4) & 3) << 4),
            (l_hi >> 4) | (((h >> 6) & 3) << 4),
        ]
        for k, q in enumerate(quads):
            for l16 in range(2):  # a scale per 16 values
                scale = sc[:, 8 * half + 2 * k + l16 : 8 * half + 2 * k + l16 + 1]
                values = (q[:, 16 * l16 : 16 * l16 + 16] - 32).astype(np.float32)
                start = 128 * half + 32 * k + 16 * l16
                out[:, start : start + 16] = d * scale * values
    return out


def _q2_k(b):
    scales = b[:, 0:16].astype(np.int32)
    qs = b[:, 16:80].astype(np.int32)
    d, dmin = _f16(b, 80), _f16(b, 82)
    out = np.empty((b.shape[0], 256), np.float32)
    position, scale_index = 0, 0
    for half in range(2):
        q = qs[:, 32 * half : 32 * half + 32]
        for shift in (0, 2, 4, 6):
            for part in range(2):  # 16 values per scale byte
                sc = scales[:, scale_index : scale_index + 1]
                scale_index += 1
                values = ((q[:, 16 * part : 16 * part + 16] >> shift) & 3).astype(np.float32)
                out[:, position : position + 16] = d * (sc & 0xF) * values - dmin * (sc >> 4)
                position += 16
    return out


def _q3_k(b):
    hmask = b[:, 0:32].astype(np.int32)
    qs = b[:, 32:96].astype(np.int32)
    aux = b[:, 96:108].copy().view("<u4").astype(np.int64)  # the 12 scale bytes as 3 little-endian words
    d = _f16(b, 108)
    low4, high2 = 0x0F0F0F0F, 0x03030303
    words = np.stack([
        (aux[:, 0] & low4) | (((aux[:, 2] >> 0) & high2) << 4),
        (aux[:, 1] & low4) | (((aux[:, 2] >> 2) & high2) << 4),
        ((aux[:, 0] >> 4) & low4) | (((aux[:, 2] >> 4) & high2) << 4),
        ((aux[:, 1] >> 4) & low4) | (((aux[:, 2] >> 6) & high2) << 4),
    ], axis=1).astype("<u4")
    scales = words.view(np.int8).reshape(-1, 16).astype(np.float32) - 32  # 16 six-bit scales
    out = np.empty((b.shape[0], 256), np.float32)
    position, scale_index, mask = 0, 0, 1
    for half in range(2):
        q = qs[:, 32 * half : 32 * half + 32]
        for shift in (0, 2, 4, 6):
            for part in range(2):
                rows = slice(16 * part, 16 * part + 16)
                low = (q[:, rows] >> shift) & 3
                high = np.where(hmask[:, rows] & mask, 0, 4)
                out[:, position : position + 16] = d * scales[:, scale_index : scale_index + 1] * (low - high)
                position, scale_index = position + 16, scale_index + 1
            mask <<= 1
    return out


_BLOCK_DEQUANT = {"Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
                  "Q4_K": (256, 144, _q4_k), "Q5_K": (256, 176, _q5_k), "Q6_K": (256, 210, _q6_k),
                  "Q2_K": (256, 84, _q2_k), "Q3_K": (256, 110, _q3_k)}
REFERENCE_TYPES = ("F32", "F16", "BF16", *_BLOCK_DEQUANT)


def reference_dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, cols] from what write_llama_gguf wrote, without the gguf package."""
    if raw.dtype == np.float32 or qtype == "F32":
        return raw.astype(np.float32)
    if qtype == "F16":
        return raw.astype(np.float32)
    if qtype == "BF16":
        bits = raw.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    _, block_bytes, dequant = _BLOCK_DEQUANT[qtype]
    rows = raw.shape[0]
    return dequant(raw.reshape(-1, block_bytes)).reshape(rows, -1)
