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
from llmexec.runner.server import RunnerConfig, RunnerServicer, attach_to_loader
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
    )
    # Bind first so health checks answer NOT_SERVING while we wait for the loader.
    servicer = RunnerServicer(device="cpu")
    running = await start_server(
        [(runner_pb2_grpc.add_RunnerServiceServicer_to_server, servicer)], [service], args.host, args.port,
        tls=transport.server_tls, health_port=transport.health_port,
    )
    log.info("runner listening on %s:%d, waiting for loader %s", args.host, running.port, args.loader)
    await wait_until_serving(args.loader, loader_service, timeout=600, tls=transport.client_tls)
    servicer.attach(*await attach_to_loader(cfg))
    await running.set_serving(True)
    await serve_until_signalled(running, transport.drain_seconds)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
