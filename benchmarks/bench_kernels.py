"""Paged attention kernels on one CUDA GPU, against the copy bandwidth and SDPA measured in the same run.

Decode (one query token per sequence, head_dim 128, 32 query heads, 8 KV heads, bf16, block
size 16, shuffled block tables): batch 1/16/64/256 x context 512/4k/32k. Reports the bytes the
kernel must read (every cached K and V byte once) over its median time, as a fraction of the
device-to-device copy bandwidth (bytes read + written over time), and the time of
torch.nn.functional.scaled_dot_product_attention on the same K/V laid out contiguously
([B, kv_heads, L, D], the group's 4 query heads as SDPA's query length). Every decode config
in DECODE_SWEEP is checked against SDPA's output, then timed; the table shows the default
config and the best one.

Prefill (causal, no earlier context): 512/2k/8k tokens, one sequence and a batch of 16k
tokens, TFLOP/s (causal: half of 4 * B * H * L^2 * D) against SDPA (is_causal, K/V expanded
to all query heads, contiguous).

Timing: CUDA events around each call, a 256 MB buffer written between calls so no input is
served from L2, median of the repeats. Writes JSON (--out) and prints tables last.

    bash scripts/gpu/run_kernel_bench.sh             # on the device machine
    python benchmarks/bench_kernels.py --smoke       # tiny shapes on CPU, Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_BATCHES = [1, 16, 64, 256]
DECODE_CONTEXTS = [512, 4096, 32768]
PREFILL_LENGTHS = [512, 2048, 8192]
PREFILL_BATCH_TOKENS = 16384


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kernels_h200.json", help="JSON results path")
    parser.add_argument("--no-sweep", action="store_true", help="time only the default configs")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    return parser.parse_args()


class Timer:
    """Median milliseconds of fn(), the L2 flushed before each call (CUDA), or wall time (CPU smoke)."""

    def __init__(self, torch, device):
        self.torch = torch
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def median_ms(self, fn, budget_ms: float = 200.0, max_reps: int = 50) -> float:
        torch = self.torch
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        fn()  # compile / warm up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end), 1e-3)
        reps = int(min(max_reps, max(5, budget_ms / estimate)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush.zero_()  # queued work ahead of the call also hides the Python launch cost
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def relative_error(torch, out, ref) -> float:
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def copy_bandwidth(torch, timer, device, smoke: bool) -> float:
    """Device-to-device copy, bytes read + written per second."""
    elements = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16: far past the 60 MB L2
    src = torch.randn(elements, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    return 2 * elements * 2 / (ms * 1e-3)


def decode_sweep(DecodeConfig, smoke: bool, no_sweep: bool):
    default = None  # the launcher's own choice for the device
    if smoke:
        return [("default", default), ("splits4", DecodeConfig(block_n=16, num_splits=4))]
    sweep = [("default", default)]
    if not no_sweep:
        sweep += [
            ("unfused", DecodeConfig(fused_merge=False)),
            ("n64w4s5", DecodeConfig(block_n=64)),
            ("n64w4s4", DecodeConfig(block_n=64, num_stages=4)),
            ("n128w4s4", DecodeConfig(block_n=128, num_stages=4)),
            ("n32w4s3", DecodeConfig(num_stages=3)),
            ("n32w4s5p2", DecodeConfig(programs_per_sm=2)),
            ("n32w4s5p4", DecodeConfig(programs_per_sm=4)),
        ]
    return sweep


def previous_default(DecodeConfig, num_seqs: int, max_seq_len: int, multiprocessors: int):
    """The default before the one-wave rule (2026-11 first H200 run): 64-key tiles, a separate merge
    kernel, and splits until the grid had 8 programs per SM (any number of waves)."""
    splits = -(-8 * multiprocessors // (num_seqs * KV_HEADS))
    splits = max(1, min(splits, max(1, max_seq_len // 256), -(-max_seq_len // 64)))
    return DecodeConfig(block_n=64, num_stages=5, num_splits=splits, fused_merge=False)


def prefill_sweep(PrefillConfig, smoke: bool, no_sweep: bool):
    sweep = [("default", None)]
    if not no_sweep and not smoke:
        sweep += [
            ("m128n64w8s3", PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)),
            ("m128n64w8s4", PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4)),
            ("m64n64w4s5", PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=5)),
            ("m128n32w8s5", PrefillConfig(block_m=128, block_n=32, num_warps=8, num_stages=5)),
            ("m64n32w4s5", PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=5)),
        ]
    return sweep


def shuffled_block_tables(torch, num_pool_blocks, num_seqs, blocks_per_seq, device):
    ids = torch.randperm(num_pool_blocks, device=device)[: num_seqs * blocks_per_seq]
    return ids.view(num_seqs, blocks_per_seq).to(torch.int32)


def contiguous_kv(torch, cache, block_tables, seq_len):
    """[B, kv_heads, seq_len, D] copy of the paged keys, a few sequences at a time to bound the temporary."""
    num_seqs = block_tables.shape[0]
    kv_heads, head_dim = cache.shape[2], cache.shape[3]
    out = torch.empty(num_seqs, kv_heads, seq_len, head_dim, dtype=cache.dtype, device=cache.device)
    chunk = max(1, (1 << 30) // (seq_len * kv_heads * head_dim * cache.element_size()))
    for first in range(0, num_seqs, chunk):
        ids = block_tables[first : first + chunk].long()
        gathered = cache[ids].view(ids.shape[0], -1, kv_heads, head_dim)[:, :seq_len]
        out[first : first + chunk] = gathered.transpose(1, 2)
    return out


def time_configs(torch, timer, sweep, launch, expected, describe) -> dict:
    """For each (name, config): check launch(config, poison=True) against expected, then time launch(config).

    describe(config, ms) adds the figures of one timed config. One failing config is recorded, not raised.
    """
    results = {}
    for name, config in sweep:
        result = results[name] = {}
        try:
            result["rel_error"] = relative_error(torch, launch(config, poison=True), expected)
            if result["rel_error"] > 2e-2:
                result["error"] = "wrong result"
                continue
            result.update(describe(config, timer.median_ms(lambda config=config: launch(config))))
        except Exception as exc:  # noqa: BLE001 -- keep timing the other configs
            result["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    return results


def decode_combo(torch, F, timer, k_cache, v_cache, batch, context, copy_bw, sweep):
    """One (batch, context) decode row: SDPA on a contiguous copy, then every config of the sweep."""
    from llmexec.kernels.triton_decode import choose_num_splits, default_decode_config, paged_decode_attention
    from llmexec.kernels.triton_support import multiprocessor_count

    num_blocks, _, kv_heads, head_dim = k_cache.shape
    heads = kv_heads * (HEADS // KV_HEADS)
    scale, device = head_dim**-0.5, k_cache.device
    tables = shuffled_block_tables(torch, num_blocks, batch, -(-context // BLOCK_SIZE), device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, heads, head_dim, dtype=k_cache.dtype, device=device)
    k_flat = contiguous_kv(torch, k_cache, tables, context)
    v_flat = contiguous_kv(torch, v_cache, tables, context)
    # The group of query heads sharing a kv head plays SDPA's query length: [B, kv_heads, group, D].
    q_grouped = query.view(batch, kv_heads, heads // kv_heads, head_dim)

    def sdpa():
        return F.scaled_dot_product_attention(q_grouped, k_flat, v_flat, scale=scale)

    expected = sdpa().reshape(batch, heads, head_dim)
    sdpa_ms = timer.median_ms(sdpa)
    moved = batch * context * 2 * kv_heads * head_dim * k_cache.element_size() + 2 * query.nbytes
    row = {"kv_bytes": moved - 2 * query.nbytes, "sdpa_us": sdpa_ms * 1e3, "sdpa_GBps": moved / sdpa_ms / 1e6}
    k_flat = v_flat = None  # free the copy before timing the kernel
    out = torch.empty_like(query)

    def launch(config, poison=False):
        if poison:  # an unwritten element then fails the check
            out.fill_(float("nan"))
        return paged_decode_attention(query, k_cache, v_cache, tables, seq_lens, context, scale, out=out, config=config)

    def describe(config, ms):
        gbps = moved / ms / 1e6
        return {"us": ms * 1e3, "GBps": gbps, "of_copy": gbps / (copy_bw / 1e9), "vs_sdpa": sdpa_ms / ms}

    row["configs"] = time_configs(torch, timer, sweep, launch, expected, describe)
    for name, config in sweep:
        effective = config or default_decode_config(device, head_dim)
        splits, partition = choose_num_splits(effective, batch, kv_heads, context, multiprocessor_count(device))
        row["configs"][name].update(config=asdict(effective), num_splits=splits, partition=partition)
    return row


def run_decode(torch, F, timer, device, copy_bw, smoke, no_sweep):
    from llmexec.kernels.triton_decode import DecodeConfig

    kv_heads, head_dim = (2, 64) if smoke else (KV_HEADS, HEAD_DIM)
    batches, contexts = ([1, 3], [40, 100]) if smoke else (DECODE_BATCHES, DECODE_CONTEXTS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    token_bytes = 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8  # K and V of one token
    # Each combo needs the pool (sized for the largest combo that fits) plus its contiguous SDPA copy.
    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 1 << 40
    combos = [(b, c) for b in batches for c in contexts]
    fitting = [(b, c) for b, c in combos if 2 * b * c * token_bytes < 0.85 * free]
    pool_blocks = max(b * -(-c // BLOCK_SIZE) for b, c in fitting) + 1
    cache_shape = (pool_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    sweep = decode_sweep(DecodeConfig, smoke, no_sweep)
    rows = []
    for batch, context in combos:
        row = {"batch": batch, "context": context}
        free_now = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 1 << 40
        if (batch, context) not in fitting or batch * context * token_bytes > 0.9 * free_now:
            row["skipped"] = f"needs {2 * batch * context * token_bytes / 1e9:.1f} GB with its SDPA copy"
        else:
            try:
                combo_sweep = sweep
                if device.type == "cuda" and not no_sweep:
                    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
                    combo_sweep = sweep + [
                        ("previous", previous_default(DecodeConfig, batch, context, multiprocessors))
                    ]
                row.update(decode_combo(torch, F, timer, k_cache, v_cache, batch, context, copy_bw, combo_sweep))
            except torch.cuda.OutOfMemoryError as exc:
                row["skipped"] = f"out of memory: {exc}".splitlines()[0]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, 2 * k_cache.nbytes


def prefill_combo(torch, F, timer, device, length, batch, heads, kv_heads, head_dim, dtype, sweep):
    """One prefill row: `batch` fresh prompts of `length` tokens, SDPA then every config of the sweep."""
    from llmexec.kernels.triton_prefill import default_prefill_config, paged_prefill_attention

    group, scale = heads // kv_heads, head_dim**-0.5
    blocks_per_seq = -(-length // BLOCK_SIZE)
    pool_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(pool_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = shuffled_block_tables(torch, pool_blocks, batch, blocks_per_seq, device)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
    query = torch.randn(batch * length, heads, head_dim, dtype=dtype, device=device)
    q_flat = query.view(batch, length, heads, head_dim).transpose(1, 2).contiguous()
    k_flat = contiguous_kv(torch, k_cache, tables, length).repeat_interleave(group, dim=1)
    v_flat = contiguous_kv(torch, v_cache, tables, length).repeat_interleave(group, dim=1)

    def sdpa():
        return F.scaled_dot_product_attention(q_flat, k_flat, v_flat, is_causal=True, scale=scale)

    expected = sdpa().transpose(1, 2).reshape(batch * length, heads, head_dim)
    flops = 4 * batch * heads * length * length * head_dim / 2
    sdpa_ms = timer.median_ms(sdpa)
    row = {"sdpa_ms": sdpa_ms, "sdpa_TFLOPs": flops / sdpa_ms / 1e9}
    q_flat = k_flat = v_flat = None
    out = torch.empty_like(query)

    def launch(config, poison=False):
        if poison:
            out.fill_(float("nan"))
        return paged_prefill_attention(
            query, k_cache, v_cache, query_start_loc, seq_lens, tables, length, scale, out=out, config=config
        )

    def describe(config, ms):
        return {"ms": ms, "TFLOPs": flops / ms / 1e9, "vs_sdpa": sdpa_ms / ms}

    row["configs"] = time_configs(torch, timer, sweep, launch, expected, describe)
    for name, config in sweep:
        row["configs"][name]["config"] = asdict(config or default_prefill_config(device, head_dim, group))
    return row


def run_prefill(torch, F, timer, device, smoke, no_sweep):
    from llmexec.kernels.triton_prefill import PrefillConfig

    heads, kv_heads, head_dim = (8, 2, 64) if smoke else (HEADS, KV_HEADS, HEAD_DIM)
    lengths, batch_tokens = ([48, 80], 160) if smoke else (PREFILL_LENGTHS, PREFILL_BATCH_TOKENS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sweep = prefill_sweep(PrefillConfig, smoke, no_sweep)
    rows = []
    for length in lengths:
        for batch in sorted({1, max(1, batch_tokens // length)}):
            row = {"tokens_per_seq": length, "batch": batch}
            try:
                args = (length, batch, heads, kv_heads, head_dim, dtype, sweep)
                row.update(prefill_combo(torch, F, timer, device, *args))
            except torch.cuda.OutOfMemoryError as exc:
                row["skipped"] = f"out of memory: {exc}".splitlines()[0]
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def best_config(configs: dict, key: str):
    timed = {name: r for name, r in configs.items() if key in r}
    if not timed:
        return None, None
    name = min(timed, key=lambda n: timed[n][key])
    return name, timed[name]


def print_tables(results) -> None:
    copy_bw = results["copy_GBps"]
    print(f"\n{results['device']}: copy bandwidth {copy_bw:.0f} GB/s (read + write)")
    print("\ndecode  bf16, 32 q heads / 8 kv heads, head_dim 128, block 16; %copy = achieved / copy bandwidth")
    header = f"{'batch':>5} {'ctx':>6} {'splits':>6} {'ours us':>9} {'GB/s':>6} {'%copy':>6} "
    header += f"{'sdpa us':>9} {'GB/s':>6} {'x sdpa':>6}  {'best config':>12} {'us':>9} {'%copy':>6}"
    header += f"  {'previous us':>11} {'%copy':>6}"
    print(header)
    for row in results["decode"]:
        if "skipped" in row or "configs" not in row:
            print(f"{row['batch']:>5} {row['context']:>6}  skipped: {row.get('skipped', 'error')}")
            continue
        d = row["configs"]["default"]
        name, best = best_config(row["configs"], "us")
        if "us" not in d:
            print(f"{row['batch']:>5} {row['context']:>6}  default config: {d.get('error')}")
            continue
        line = f"{row['batch']:>5} {row['context']:>6} {d['num_splits']:>6} {d['us']:>9.1f} {d['GBps']:>6.0f} "
        line += f"{100 * d['of_copy']:>5.1f}% {row['sdpa_us']:>9.1f} {row['sdpa_GBps']:>6.0f} {d['vs_sdpa']:>6.2f}"
        line += f"  {name:>12} {best['us']:>9.1f} {100 * best['of_copy']:>5.1f}%"
        previous = row["configs"].get("previous", {})
        if "us" in previous:
            line += f"  {previous['us']:>11.1f} {100 * previous['of_copy']:>5.1f}%"
        print(line)
    print("\nprefill  causal, bf16, 32 q heads / 8 kv heads, head_dim 128; TFLOP/s counts the causal half")
    print(
        f"{'tokens':>6} {'batch':>5} {'ours ms':>8} {'TFLOP/s':>8} {'sdpa ms':>8} {'TFLOP/s':>8} {'x sdpa':>6}  "
        f"{'best config':>13} {'TFLOP/s':>8}"
    )
    for row in results["prefill"]:
        d = row.get("configs", {}).get("default", {})
        if "ms" not in d:
            print(f"{row['tokens_per_seq']:>6} {row['batch']:>5}  {row.get('skipped') or d.get('error')}")
            continue
        name, best = best_config(row["configs"], "ms")
        print(
            f"{row['tokens_per_seq']:>6} {row['batch']:>5} {d['ms']:>8.3f} {d['TFLOPs']:>8.0f} "
            f"{row['sdpa_ms']:>8.3f} {row['sdpa_TFLOPs']:>8.0f} {d['vs_sdpa']:>6.2f}  {name:>13} {best['TFLOPs']:>8.0f}"
        )


def main() -> int:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        if not args.smoke:
            print("no CUDA device: use --smoke for the CPU interpreter run", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    import torch.nn.functional as F
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    timer = Timer(torch, device)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor()})",
        "multiprocessors": torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": "median of CUDA-event times per call, 256 MB L2 flush between calls",
    }
    results["copy_GBps"] = copy_bandwidth(torch, timer, device, args.smoke) / 1e9
    if device.type == "cuda":
        torch.cuda.empty_cache()  # mem_get_info counts cached blocks as used
    results["decode"], results["decode_pool_bytes"] = run_decode(
        torch, F, timer, device, results["copy_GBps"] * 1e9, args.smoke, args.no_sweep
    )
    results["prefill"] = run_prefill(torch, F, timer, device, args.smoke, args.no_sweep)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
