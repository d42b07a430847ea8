"""`python -m llmexec.loader --port 50052 --model PATH`: run the loader alone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from llmexec.loader.checkpoint import LOAD_FORMATS
from llmexec.loader.model_store import ModelStore
from llmexec.loader.server import LoaderServicer
from llmexec.loader.shm_store import remove_stale_segments
from llmexec.quantization import QUANTIZATION_HELP, QUANTIZATIONS
from llmexec.rpc.server import configure_logging, serve_until_signalled, start_server
from llmexec.rpc.transport_args import add_transport_args, transport_from_args
from llmexec.v1 import loader_pb2, loader_pb2_grpc

log = logging.getLogger("llmexec.loader")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmexec.loader", description=__doc__)
    p.add_argument("--host", default=os.environ.get("LLMEXEC_LOADER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("LLMEXEC_LOADER_PORT", "50052")))
    p.add_argument("--model", default=os.environ.get("LLMEXEC_MODEL", ""),
                   help="HF folder, .gguf file, config.json (with --load-format dummy) or a model id in the local "
                        "HF cache, to load at start (default: none; use LoadModel)")
    p.add_argument("--load-format", default=os.environ.get("LLMEXEC_LOAD_FORMAT", "auto"), choices=LOAD_FORMATS,
                   help="auto picks safetensors, then pt (.bin), then gguf; dummy makes random weights from the config")
    p.add_argument("--dtype", default=os.environ.get("LLMEXEC_DTYPE", ""),
                   help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--device", default=os.environ.get("LLMEXEC_LOADER_DEVICE", "cpu"),
                   help="where the weights are kept: cpu (/dev/shm) or cuda[:N] (one GPU allocation per model, "
                        "shared with runners over CUDA IPC)")
    p.add_argument("--quantization", default=os.environ.get("LLMEXEC_QUANTIZATION", ""),
                   choices=["", *QUANTIZATIONS], help=QUANTIZATION_HELP)
    p.add_argument("--quantization-group-size", type=int,
                   default=int(os.environ.get("LLMEXEC_QUANTIZATION_GROUP_SIZE", "0")),
                   help="input columns per int4 scale (default 128)")
    p.add_argument("--tensor-parallel-size", type=int,
                   default=int(os.environ.get("LLMEXEC_TENSOR_PARALLEL_SIZE", "1")),
                   help="keep --model split over this many ranks, one shared-memory shard each; the runner "
                        "starts one process per rank")
    p.add_argument("--log-level", default=os.environ.get("LLMEXEC_LOG_LEVEL", "INFO"))
    add_transport_args(p, "loader")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    for path in remove_stale_segments():
        log.warning("removed %s: a weight file left by a loader that is gone", path)
    store = ModelStore(args.device)
    transport = transport_from_args(args)
    service = loader_pb2.DESCRIPTOR.services_by_name["LoaderService"].full_name
    running = await start_server(
        [(loader_pb2_grpc.add_LoaderServiceServicer_to_server, LoaderServicer(store))],
        [service], args.host, args.port, tls=transport.server_tls, health_port=transport.health_port,
    )
    log.info("loader listening on %s:%d", args.host, running.port)
    try:
        if args.model:
            await asyncio.to_thread(store.load, args.model, args.load_format, args.dtype, args.quantization,
                                    args.quantization_group_size, args.tensor_parallel_size)
        await running.set_serving(True)
        await serve_until_signalled(running, transport.drain_seconds)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
