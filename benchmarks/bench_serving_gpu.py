"""Issue 6 benchmark: the full serving path on a GPU against transformers `generate` in the same run.

Dummy Llama-3-8B-shaped weights (32 layers, hidden 4096, 32 heads, 8 KV heads, intermediate
14336, vocab 128256, bf16), made on the GPU by the loader. Measures:
  - batch-1 decode, 128 in / 128 out: ms per output token through gRPC client -> scheduler ->
    runner (floor 3.7 ms: 16 GB of weights read once at 4.28 TB/s), against transformers;
  - offline throughput, 1,000 requests of 256 in / 256 out submitted at once: output tokens/s,
    against one padded transformers batch of the same shape;
  - runner ready time: attaching to the loaded model (process start -> SERVING, and the attach
    itself) against the loader loading the same model from safetensors on disk;
  - per-step time not spent on the GPU at batch 1 and 256: the full path's time per decode step
    minus the GPU time of the same step (its CUDA graph replayed alone, timed with events).

    python benchmarks/bench_serving_gpu.py --out benchmarks/results/serving_h200.json
    python benchmarks/bench_serving_gpu.py --tiny        # a tiny model on CPU: checks the script itself

Prints a compact table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_services import LocalServices

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024, "bos_token_id": 1,
        "eos_token_id": 2}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the client side


def prompt_of(index: int, length: int, vocab: int) -> list[int]:
    return [(index * 7919 + j * 104729) % (vocab - 10) + 10 for j in range(length)]


async def stream_one(stub, prompt: list[int], max_tokens: int, stream_interval: int = 1) -> list[float]:
    """Generate greedily ignoring EOS; the arrival time of each output token."""
    from llmexec.v1 import sampling_pb2, scheduler_pb2

    request = scheduler_pb2.GenerateRequest(
        prompt_token_ids=prompt, stream_interval=stream_interval,
        sampling_params=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    times = []
    async for reply in stub.Generate(request, timeout=3600):
        now = time.perf_counter()
        times += [now] * len(reply.token_ids)
    return times


async def run_requests(address: str, prompts: list[list[int]], max_tokens: int,
                       stream_interval: int = 1) -> tuple[float, list[list[float]]]:
    """All prompts at once: (wall seconds, token times per request)."""
    import grpc

    from llmexec.v1 import scheduler_pb2_grpc

    # Several connections: a server may cap the concurrent streams of one (HTTP/2 setting).
    channels = [grpc.aio.insecure_channel(address) for _ in range(-(-len(prompts) // 64))]
    try:
        stubs = [scheduler_pb2_grpc.SchedulerServiceStub(c) for c in channels]
        start = time.perf_counter()
        times = await asyncio.gather(*(stream_one(stubs[i // 64], p, max_tokens, stream_interval)
                                       for i, p in enumerate(prompts)))
        return time.perf_counter() - start, times
    finally:
        for channel in channels:
            await channel.close()


def decode_step_seconds(times: list[list[float]]) -> float:
    """The decode step: per stream, the time from its second token to its last over the steps
    between them (a reader that falls behind gets tokens merged, so single gaps mislead);
    the median over streams."""
    return statistics.median((stream[-1] - stream[1]) / (len(stream) - 2) for stream in times if len(stream) > 2)


# -- GPU time of one decode step, alone


def gpu_step_seconds(loader_address: str, batch_sizes: list[int], context: int, block_size: int) -> dict[int, float]:
    """Attach to the loader's weights in this process (CUDA IPC, like a runner), capture the decode
    graph at each batch size and time its replay with CUDA events: the GPU's own time per step."""
    import grpc
    import torch

    from llmexec.rpc.client import sync_channel
    from llmexec.runner.cuda_graphs import DecodeGraphs
    from llmexec.runner.cuda_ipc_attach import attach_cuda_weights
    from llmexec.runner.model_runner import GpuOptions, ModelRunner
    from llmexec.runner.server import layout_from_pb
    from llmexec.step import SequenceInput, StepInput
    from llmexec.v1 import loader_pb2, loader_pb2_grpc

    with sync_channel(loader_address) as channel:
        pb = loader_pb2_grpc.LoaderServiceStub(channel).GetWeightLayout(loader_pb2.GetWeightLayoutRequest(),
                                                                        timeout=60)
    del grpc
    weights = attach_cuda_weights(layout_from_pb(pb))
    config = json.loads(pb.model_info.config_json)
    per_seq = -(-(context + 1) // block_size)
    num_blocks = max(batch_sizes) * per_seq + 1
    runner = ModelRunner(config, weights, num_blocks, block_size, "cuda", gpu=GpuOptions(cuda_graph_max_batch=0))
    graphs = DecodeGraphs(runner.model, runner.kv_caches, block_size, max(batch_sizes), 4096, runner.device)
    graphs.sizes = sorted(batch_sizes)
    graphs.capture()
    result = {}
    for batch in batch_sizes:
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
        step = StepInput([11] * batch, [context] * batch, [t[context // block_size] * block_size + context % block_size
                                                           for t in tables],
                         [SequenceInput(1, context + 1, t, True) for t in tables])
        for _ in range(3):
            graphs.run(step)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        repeats = 20
        start.record()
        for _ in range(repeats):
            graphs.graphs[batch].replay()
        end.record()
        torch.cuda.synchronize()
        result[batch] = start.elapsed_time(end) / 1000 / repeats
    del graphs, runner, weights
    torch.cuda.empty_cache()
    return result


# -- transformers, in its own process so its memory is gone before ours starts


def transformers_baseline(config: dict, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).to(dtype).eval()
    vocab = config["vocab_size"]

    def generate(batch: int, input_len: int, new_tokens: int) -> float:
        ids = torch.tensor([prompt_of(i, input_len, vocab) for i in range(batch)], device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(1, 16, 4)  # warm-up
    one = generate(1, args.decode_input, 1)
    full = generate(1, args.decode_input, args.decode_output)
    batch_seconds = generate(args.hf_batch, args.input_len, args.output_len)
    return {
        "batch1_ms_per_token": 1000 * (full - one) / (args.decode_output - 1),
        "batch1_ms_per_token_incl_prefill": 1000 * full / args.decode_output,
        "throughput_batch": args.hf_batch,
        "throughput_tok_s": args.hf_batch * args.output_len / batch_seconds,
        "attention": getattr(model.config, "_attn_implementation", "?"),
    }


# -- a safetensors checkpoint of the same shapes, for the load-from-disk comparison


def write_checkpoint(folder: Path, config: dict) -> int:
    import torch
    from safetensors.torch import save_file

    from llmexec.loader.config_tensors import config_tensor_specs

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shard, shard_bytes, index, total, n = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name))
            index.update({key: name for key in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for spec in config_tensor_specs(config):
        tensor = torch.randn(spec.shape, device=device, dtype=torch.bfloat16).mul_(0.02).cpu()
        shard[spec.name] = tensor
        shard_bytes += tensor.numel() * 2
        total += tensor.numel() * 2
        if shard_bytes > 4 << 30:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return total


# -- our stack


def runner_log_timings(path: Path) -> dict:
    text = path.read_text()
    found = {}
    match = re.search(r"attach timings: (\{.*\})", text)
    if match:
        found = json.loads(match.group(1))
    match = re.search(r"captured (\d+) decode CUDA graphs .* in ([\d.]+) s", text)
    if match:
        found["graphs"] = int(match.group(1))
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/serving_h200.json")
    p.add_argument("--tiny", action="store_true", help="a tiny model and few requests (checks the script on CPU)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--decode-input", type=int, default=128)
    p.add_argument("--decode-output", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--throughput-stream-interval", type=int, default=0,
                   help="GenerateRequest.stream_interval of the throughput requests (default: output-len, one "
                        "message per request, as an offline run; 1 streams every token)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-disk", action="store_true")
    p.add_argument("--skip-sync", action="store_true", help="skip the decode runs with async scheduling off")
    p.add_argument("--profile-dir", default="", help="py-spy the scheduler and runner through the batch-N and "
                                                     "throughput runs; raw stacks go here")
    p.add_argument("--work-dir", default="", help="where service logs go (default: a new temporary folder)")
    p.add_argument("--transformers-only", default="", help=argparse.SUPPRESS)  # internal: the baseline process
    args = p.parse_args()
    config = TINY if args.tiny else LLAMA3_8B
    if args.tiny:
        args.requests, args.input_len, args.output_len = min(args.requests, 48), 16, 16
        args.decode_input, args.decode_output, args.hf_batch = 16, 16, 8
        args.max_num_seqs = min(args.max_num_seqs, 32)
    if args.transformers_only:
        Path(args.transformers_only).write_text(json.dumps(transformers_baseline(config, args)))
        return 0

    import torch

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="llmexec-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    results: dict = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "model": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size")},
        "floors": {"batch1_ms_per_token": 3.7, "note": "16 GB of bf16 weights read once at 4.28 TB/s"},
        "goals": {"batch1_ms_per_token": 4.5, "throughput_tok_s": 15000, "attach_s": 1.0},
    }
    out = Path(os.environ["OUT"]) / Path(args.out).name if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase: a run cut short keeps what it measured
        out.write_text(json.dumps(results, indent=2))

    if not args.skip_transformers:
        log("transformers baseline")
        baseline_file = work / "transformers.json"
        passthrough = [a for a in sys.argv[1:] if a not in ("--skip-disk",)]
        subprocess.run([sys.executable, __file__, *passthrough, "--transformers-only", str(baseline_file)], check=True)
        results["transformers"] = json.loads(baseline_file.read_text())
        log(f"transformers: {results['transformers']}")
        save()

    runner_flags = ["--max-num-batched-tokens", str(args.max_num_batched_tokens),
                    "--cuda-graph-max-batch", str(args.max_num_seqs), "--cuda-graph-max-seq-len", "4096"]
    with LocalServices(work) as services:
        start = time.perf_counter()
        loader = services.loader(str(model_dir / "config.json"), "--load-format", "dummy", "--device", device)
        results["loader_dummy_ready_s"] = time.perf_counter() - start
        log(f"loader ready in {results['loader_dummy_ready_s']:.1f} s")

        if on_gpu:
            log("GPU time per decode step (graph replay alone)")
            results["gpu_step_ms"] = {str(b): 1000 * s for b, s in
                                      gpu_step_seconds(loader, [1, args.max_num_seqs], args.decode_input + 64,
                                                       16).items()}
            log(f"GPU step ms: {results['gpu_step_ms']}")

        start = time.perf_counter()
        runner = services._start("runner", "runner", ["--loader", loader, *runner_flags, "--num-blocks", "0"
                                                       if on_gpu else "4096", "--gpu-memory-utilization", "0.88"])
        results["runner_attach_ready_s"] = time.perf_counter() - start
        results["runner_attach_timings"] = runner_log_timings(work / "runner.log")
        log(f"runner ready in {results['runner_attach_ready_s']:.1f} s: {results['runner_attach_timings']}")
        scheduler = services.scheduler([runner], loader, "--no-prefix-caching", "--max-num-seqs",
                                       str(args.max_num_seqs), "--max-num-batched-tokens",
                                       str(args.max_num_batched_tokens), "--max-queue-len", str(args.requests + 64))
        vocab = config["vocab_size"]
        asyncio.run(run_requests(scheduler, [prompt_of(i, 32, vocab) for i in range(4)], 8))  # warm-up

        log("batch-1 decode")
        per_token = []
        for repeat in range(3):
            _, times = asyncio.run(run_requests(scheduler, [prompt_of(repeat, args.decode_input, vocab)],
                                                args.decode_output))
            stream = times[0]
            per_token.append((stream[-1] - stream[0]) / (len(stream) - 1))
        results["batch1_ms_per_token"] = 1000 * statistics.median(per_token)
        log(f"batch-1: {results['batch1_ms_per_token']:.2f} ms/token")
        save()

        profilers = [] if not args.profile_dir else [
            subprocess.Popen(["py-spy", "record", "--nonblocking", "-r", "250", "-f", "raw", "-p",
                              str(services.procs[name].pid), "-o", f"{args.profile_dir}/{name}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            for name in ("scheduler", "runner")
        ]
        log(f"decode step at batch {args.max_num_seqs}")
        prompts = [prompt_of(1000 + i, args.decode_input, vocab) for i in range(args.max_num_seqs)]
        _, times = asyncio.run(run_requests(scheduler, prompts, args.decode_output))
        results[f"batch{args.max_num_seqs}_step_ms"] = 1000 * decode_step_seconds(times)
        save()

        interval = args.throughput_stream_interval or args.output_len
        log(f"offline throughput: {args.requests} x {args.input_len} in / {args.output_len} out, "
            f"stream_interval {interval}")
        prompts = [prompt_of(5000 + i, args.input_len, vocab) for i in range(args.requests)]
        wall, times = asyncio.run(run_requests(scheduler, prompts, args.output_len, interval))
        generated = sum(len(t) for t in times)
        results["throughput"] = {"requests": args.requests, "output_tokens": generated, "seconds": wall,
                                 "output_tok_s": generated / wall, "max_num_seqs": args.max_num_seqs,
                                 "stream_interval": interval}
        log(f"throughput: {results['throughput']}")
        save()
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)

        if not args.skip_sync:
            # The same decode measurements with async scheduling off: the in-run baseline for it.
            log("batch-1 and batch-N decode with --no-async-scheduling")
            services.stop("scheduler")
            sync_scheduler = services.scheduler([runner], loader, "--no-prefix-caching", "--no-async-scheduling",
                                                "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
                                                str(args.max_num_batched_tokens), name="scheduler-sync")
            per_token = []
            for repeat in range(3):
                _, times = asyncio.run(run_requests(sync_scheduler, [prompt_of(repeat, args.decode_input, vocab)],
                                                    args.decode_output))
                per_token.append((times[0][-1] - times[0][0]) / (len(times[0]) - 1))
            prompts = [prompt_of(1000 + i, args.decode_input, vocab) for i in range(args.max_num_seqs)]
            _, times = asyncio.run(run_requests(sync_scheduler, prompts, args.decode_output))
            results["sync_scheduling"] = {"batch1_ms_per_token": 1000 * statistics.median(per_token),
                                          f"batch{args.max_num_seqs}_step_ms": 1000 * decode_step_seconds(times)}
            log(f"sync scheduling: {results['sync_scheduling']}")
            save()

        if on_gpu:
            gpu = results["gpu_step_ms"]
            results["non_gpu_ms_per_step"] = {
                "1": results["batch1_ms_per_token"] - gpu["1"],
                str(args.max_num_seqs): results[f"batch{args.max_num_seqs}_step_ms"] - gpu[str(args.max_num_seqs)],
            }

        # A second runner on the loaded weights, kernels compiled and cached by now: the attach
        # path alone (it gets a small cache: the first runner holds the memory).
        start = time.perf_counter()
        services._start("runner2", "runner", ["--loader", loader, *runner_flags, "--num-blocks", "512"])
        results["second_runner_attach_ready_s"] = time.perf_counter() - start
        results["second_runner_attach_timings"] = runner_log_timings(work / "runner2.log")

    if not args.skip_disk:
        log("load from disk: writing a safetensors checkpoint of the same shapes")
        disk_dir = work / "disk-model"
        results["disk_checkpoint_bytes"] = write_checkpoint(disk_dir, config)
        subprocess.run(["sync"], check=False)
        dropped = subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False,
                                 capture_output=True).returncode
        results["disk_page_cache_dropped"] = dropped == 0
        with LocalServices(work) as services:
            start = time.perf_counter()
            loader = services.loader(str(disk_dir), "--device", device)
            results["loader_disk_ready_s"] = time.perf_counter() - start
            start = time.perf_counter()
            services._start("runner3", "runner", ["--loader", loader, *runner_flags, "--num-blocks", "512"])
            results["disk_runner_ready_s"] = time.perf_counter() - start
        log(f"from disk: loader {results['loader_disk_ready_s']:.1f} s + runner {results['disk_runner_ready_s']:.1f} s")

    save()
    print_table(results, args)
    print(f"results: {out}")
    return 0


def print_table(results: dict, args) -> None:
    hf = results.get("transformers", {})
    rows = [
        ("batch-1 decode ms/token (full path)", results.get("batch1_ms_per_token"), hf.get("batch1_ms_per_token"),
         "floor 3.7, goal <= 4.5"),
        (f"throughput tok/s ({args.requests} x {args.input_len}/{args.output_len})",
         results.get("throughput", {}).get("output_tok_s"), hf.get("throughput_tok_s"),
         f"hf: one batch of {hf.get('throughput_batch')}; goal >= 15000"),
        ("runner ready s, attach (1st, cold)", results.get("runner_attach_ready_s"), None, "process start -> SERVING"),
        ("runner ready s, attach (2nd)", results.get("second_runner_attach_ready_s"), None, "goal attach < 1 s"),
        ("loader ready s, safetensors from disk", results.get("loader_disk_ready_s"), None,
         f"+ runner {results.get('disk_runner_ready_s', 0):.1f} s"),
    ]
    for batch, value in results.get("gpu_step_ms", {}).items():
        rows.append((f"GPU ms per decode step, batch {batch}", value, None, "graph replay alone"))
    for batch, value in results.get("non_gpu_ms_per_step", {}).items():
        rows.append((f"non-GPU ms per step, batch {batch}", value, None, "full path - GPU"))
    batch_key = f"batch{args.max_num_seqs}_step_ms"
    rows.append((f"decode step ms, batch {args.max_num_seqs} (full path)", results.get(batch_key), None, ""))
    for name, value in results.get("sync_scheduling", {}).items():
        rows.append((f"  same, async scheduling off: {name}", value, None, "baseline for async scheduling"))
    print(f"\n{'metric':<52} {'llmexec':>10} {'transformers':>13}  note")
    for name, ours, theirs, note in rows:
        fmt = lambda v: f"{v:10.2f}" if isinstance(v, (int, float)) else f"{'-':>10}"
        print(f"{name:<52} {fmt(ours)} {fmt(theirs):>13}  {note}")
    print(f"attach timings: 1st {results.get('runner_attach_timings')}, 2nd {results.get('second_runner_attach_timings')}")


if __name__ == "__main__":
    raise SystemExit(main())
