"""Compile the attention kernels for sm_90 on a machine with no GPU and print what the compiler did.

For each decode/prefill config: registers per thread, spill stack, shared memory, the
resident programs per SM those allow, how many K/V shared buffers the software pipeliner
made, and the async-copy wait depth (0: every tile's load latency is exposed). Costs no
device time; uses the ptxas and cuobjdump that ship in Triton's wheel (checked with 3.9).

    python benchmarks/inspect_kernels.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmexec.kernels import triton_decode, triton_prefill

SM90 = GPUTarget("cuda", 90, 32)
REGS_PER_SM, SMEM_PER_SM = 65536, 232448
_POINTERS = {
    "q_ptr": "*bf16",
    "k_cache_ptr": "*bf16",
    "v_cache_ptr": "*bf16",
    "out_ptr": "*bf16",
    "block_tables_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "query_start_loc_ptr": "*i32",
    "alibi_slopes_ptr": "*fp32",
    "part_acc_ptr": "*fp32",
    "part_max_ptr": "*fp32",
    "part_sum_ptr": "*fp32",
    "split_counters_ptr": "*i32",
}


def compile_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int):
    names = kernel.arg_names
    signature = {
        n: "constexpr" if n in constexprs else _POINTERS.get(n, "fp32" if n == "scale_log2" else "i32") for n in names
    }
    # As the launcher's arguments specialize: pointers and strides divisible by 16.
    aligned = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if n.endswith("_ptr") or n.startswith(("stride_k", "stride_v"))
    }
    source = ASTSource(kernel, signature, constexprs, aligned)
    return triton.compile(source, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})


def describe(name: str, compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    smem, warps = compiled.metadata.shared, compiled.metadata.num_warps
    per_sm = min(REGS_PER_SM // (-(-regs // 8) * 8 * 32 * warps), SMEM_PER_SM // max(smem, 1))
    ttgir = compiled.asm["ttgir"]
    buffers = sorted({int(m) for m in re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", ttgir)})
    waits = sorted({int(m) for m in re.findall(r"async_wait [^{]*\{num = (\d+)", ttgir)})
    return (
        f"{name:<34} regs {regs:>3} stack {stack:>3} smem {smem // 1024:>3} KB -> {per_sm} per SM, "
        f"K/V buffers {buffers}, async waits {waits}"
    )


def main() -> None:
    decode_configs = [(64, 4, 3, False), (64, 4, 5, False), (64, 4, 5, True), (32, 4, 5, True), (64, 8, 5, True),
                      (128, 4, 4, True), (128, 8, 4, True), (64, 4, 4, True)]
    for block_n, warps, stages, fused in decode_configs:
        constexprs = dict(
            NUM_HEADS=32,
            GROUP=4,
            BLOCK_M=16,
            HEAD_DIM=128,
            BLOCK_D=128,
            BLOCK_SIZE=16,
            BLOCK_N=block_n,
            USE_ALIBI=False,
            USE_WINDOW=False,
            SINGLE_SPLIT=False,
            FUSED_MERGE=fused,
            MERGE_BLOCK_H=4,
            MERGE_BLOCK_S=triton_decode.merge_block_splits(4, 128),
            DOT_PRECISION="tf32",
        )
        compiled = compile_sm90(triton_decode._decode_partition_kernel, constexprs, warps, stages)
        print(describe(f"decode n{block_n} w{warps} s{stages}{' fused' if fused else ''}", compiled))
    for block_m, block_n, warps, stages in [(128, 64, 8, 3), (128, 64, 8, 5), (64, 64, 4, 5), (128, 32, 8, 5)]:
        constexprs = dict(
            GROUP=4,
            BLOCK_M=block_m,
            HEAD_DIM=128,
            BLOCK_D=128,
            BLOCK_SIZE=16,
            BLOCK_N=block_n,
            USE_ALIBI=False,
            USE_WINDOW=False,
            SKIP_SINGLE_TOKEN=False,
            DOT_PRECISION="tf32",
        )
        compiled = compile_sm90(triton_prefill._prefill_kernel, constexprs, warps, stages)
        print(describe(f"prefill m{block_m} n{block_n} w{warps} s{stages}", compiled))


if __name__ == "__main__":
    main()
