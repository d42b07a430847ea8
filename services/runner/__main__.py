"""`python -m llmexec.runner --port 50053 --loader 127.0.0.1:50052`: run a runner alone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import torch

from llmexec.rpc.client import wait_until_serving
from llmexec.rpc.server import configure_logging, serve_until_signalled, start_server
from llmexec.rpc.transport_args import add_transport_args, transport_from_args
from llmexec.runner.model_runner import GpuOptions
from llmexec.runner.server import RunnerConfig, RunnerServicer, attach_to_loader, keep_attached
from llmexec.v1 import loader_pb2, runner_pb2, runner_pb2_grpc

log = logging.getLogger("llmexec.runner")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m llmexec.runner", description=__doc__)
    p.add_argument("--host", default=env("LLMEXEC_RUNNER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("LLMEXEC_RUNNER_PORT", "50053")))
    p.add_argument("--loader", default=env("LLMEXEC_LOADER_ADDRESS", "127.0.0.1:50052"),
                   help="address of the LoaderService holding the weights")
    p.add_argument("--model-id", default=env("LLMEXEC_MODEL_ID", ""), help="default: the loader's first model")
    p.add_argument("--block-size", type=int, default=int(env("LLMEXEC_BLOCK_SIZE", "16")))
    p.add_argument("--num-blocks", type=int, default=int(env("LLMEXEC_NUM_BLOCKS", "0")),
                   help="KV cache blocks; 0 sizes the cache from --kv-cache-gib")
    p.add_argument("--kv-cache-gib", type=float, default=float(env("LLMEXEC_KV_CACHE_GIB", "1.0")))
    p.add_argument("--device", default=env("LLMEXEC_RUNNER_DEVICE", "auto"),
                   help="auto: the loader's GPU when it holds the weights there (CUDA IPC, no copy), else cpu; "
                        "cuda copies shared-memory weights to the GPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=float(env("LLMEXEC_GPU_MEMORY_UTILIZATION", "0.9")),
                   help="on a GPU with --num-blocks 0: the share of its memory in use (all processes) once this "
                        "runner's KV cache is allocated")
    p.add_argument("--max-num-batched-tokens", type=int, default=int(env("LLMEXEC_MAX_NUM_BATCHED_TOKENS", "8192")),
                   help="the largest step; a forward pass of this many tokens is profiled for activation memory")
    p.add_argument("--cuda-graph-max-batch", type=int, default=int(env("LLMEXEC_CUDA_GRAPH_MAX_BATCH", "256")),
                   help="decode steps of up to this many sequences replay CUDA graphs; 0 turns graphs off")
    p.add_argument("--cuda-graph-max-seq-len", type=int, default=int(env("LLMEXEC_CUDA_GRAPH_MAX_SEQ_LEN", "8192")),
                   help="decode steps with longer contexts run eagerly")
    p.add_argument("--loader-check-seconds", type=float, default=float(env("LLMEXEC_LOADER_CHECK_SECONDS", "1.0")),
                   help="how often to check that the loader still holds the attached weights (re-attaching when it "
                        "restarted); 0: never")
    p.add_argument("--threads", type=int, default=int(env("LLMEXEC_THREADS", "0")),
                   help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--log-level", default=env("LLMEXEC_LOG_LEVEL", "INFO"))
    add_transport_args(p, "runner")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    service = runner_pb2.DESCRIPTOR.services_by_name["RunnerService"].full_name
    loader_service = loader_pb2.DESCRIPTOR.services_by_name["LoaderService"].full_name
    transport = transport_from_args(args)
    cfg = RunnerConfig(
        loader_address=args.loader,
        model_id=args.model_id,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        loader_tls=transport.client_tls,
        device=args.device,
        gpu=GpuOptions(
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=args.max_num_batched_tokens,
            cuda_graph_max_batch=args.cuda_graph_max_batch,
            cuda_graph_max_seq_len=args.cuda_graph_max_seq_len,
        ),
        loader_check_seconds=args.loader_check_seconds,
    )
    # Bind first so health checks answer NOT_SERVING while we wait for the loader.
    servicer = RunnerServicer(device="cpu")
    running = await start_server(
        [(runner_pb2_grpc.add_RunnerServiceServicer_to_server, servicer)], [service], args.host, args.port,
        tls=transport.server_tls, health_port=transport.health_port,
    )
    log.info("runner listening on %s:%d, waiting for loader %s", args.host, running.port, args.loader)
    warmed = asyncio.create_task(asyncio.to_thread(_prewarm, args.device))
    await wait_until_serving(args.loader, loader_service, timeout=600, tls=transport.client_tls)
    await warmed
    servicer.attach(*await attach_to_loader(cfg))
    await running.set_serving(True)
    watcher = asyncio.create_task(keep_attached(servicer, cfg, running)) if args.loader_check_seconds > 0 else None
    try:
        await serve_until_signalled(running, transport.drain_seconds)
    finally:
        if watcher is not None:
            watcher.cancel()


def _prewarm(device: str) -> None:
    """One-time costs paid while the loader may still be loading, not in the attach: torch's first
    meta-device embedding (~1 s: it loads its meta kernels) and, on a GPU, the CUDA context."""
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.init()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
