"""Weight-only quantization: how a linear layer's weight is stored in shared memory, and the
modules that compute with it.

The loader replaces a linear layer's `<module>.weight` [out, in] with components
named after the module, every one of them row-major per output channel, so the
weight plan fuses q/k/v and gate/up components exactly as it fuses weights (by
stacking rows), and a GGUF's Q/K row order is undone row by row:

    <module>.weight_q       the codes: int8 [out, in] (int8), float8_e4m3fn [out, in]
                            (fp8), or uint8 [out, ceil(in / 2)] holding two 4-bit codes
                            per byte, low nibble first (int4)
    <module>.weight_scale   float [out] per channel (int8, fp8) or [out, groups] (int4)
    <module>.weight_offset  int4 only: float [out, groups]; w = code * scale + offset
    <module>.weight_g_idx   int4 only, GPTQ act-order: int32 [parts, in], the group of
                            each input column (one identical row per fused part)

The runner (llmexec.quantization.linear_swap) swaps each such nn.Linear for the
quantized module matching the codes' dtype; the codes are never expanded to a
full-precision copy that outlives one matmul.
"""

# The schemes `--quantization` takes; "" (not listed) means the checkpoint's own, else none.
QUANTIZATIONS = ("none", "int8", "int4", "fp8", "gguf", "gptq", "awq")
QUANTIZATION_HELP = (
    "weights: none, int8 (per channel), int4 (per group), fp8 (e4m3, per channel), gguf (keep a GGUF's "
    "Q4_0/Q4_1 blocks as they are), gptq, awq; default: the checkpoint's own (GPTQ/AWQ) or none"
)

CODES = "weight_q"
SCALE = "weight_scale"
OFFSET = "weight_offset"
G_IDX = "weight_g_idx"
COMPONENTS = (CODES, SCALE, OFFSET, G_IDX)
