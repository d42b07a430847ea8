"""`python -m llmexec.loader --port 50052 --model PATH`: run the loader alone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from llmexec.loader.model_store import ModelStore
from llmexec.loader.server import LoaderServicer
from llmexec.rpc.server import configure_logging, serve_until_signalled, start_server
from llmexec.v1 import loader_pb2, loader_pb2_grpc

log = logging.getLogger("llmexec.loader")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmexec.loader", description=__doc__)
    p.add_argument("--host", default=os.environ.get("LLMEXEC_LOADER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("LLMEXEC_LOADER_PORT", "50052")))
    p.add_argument("--model", default=os.environ.get("LLMEXEC_MODEL", ""),
                   help="HF folder or .gguf file to load at start (default: none; use LoadModel)")
    p.add_argument("--load-format", default=os.environ.get("LLMEXEC_LOAD_FORMAT", "auto"))
    p.add_argument("--dtype", default=os.environ.get("LLMEXEC_DTYPE", "float32"))
    p.add_argument("--log-level", default=os.environ.get("LLMEXEC_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    store = ModelStore()
    service = loader_pb2.DESCRIPTOR.services_by_name["LoaderService"].full_name
    running = await start_server(
        [(loader_pb2_grpc.add_LoaderServiceServicer_to_server, LoaderServicer(store))],
        [service], args.host, args.port,
    )
    log.info("loader listening on %s:%d", args.host, running.port)
    try:
        if args.model:
            await asyncio.to_thread(store.load, args.model, args.load_format, args.dtype)
        await running.set_serving(True)
        await serve_until_signalled(running)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
