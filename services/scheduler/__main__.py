"""`python -m llmexec.scheduler --port 50051 --runner ... --loader ...`: run the scheduler alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os

from llmexec.redis_server import EmbeddedRedis
from llmexec.rpc.auth import BearerTokenInterceptor, read_token
from llmexec.rpc.client import aio_channel, wait_until_serving
from llmexec.rpc.server import configure_logging, serve_until_signalled, start_server
from llmexec.rpc.transport_args import add_transport_args, transport_from_args
from llmexec.scheduler.engine import Engine
from llmexec.scheduler.redis_connection import connect_redis, read_password_file, redact
from llmexec.scheduler.replica import SchedulerConfig
from llmexec.scheduler.runner_pool import build_replicas, connect_runners, parse_addresses
from llmexec.scheduler.server import SchedulerServicer
from llmexec.scheduler.state_store import SequenceStore
from llmexec.scheduler.tokenizer import Tokenizer
from llmexec.v1 import loader_pb2, loader_pb2_grpc, runner_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("llmexec.scheduler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m llmexec.scheduler", description=__doc__)
    p.add_argument("--host", default=env("LLMEXEC_SCHEDULER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("LLMEXEC_SCHEDULER_PORT", "50051")))
    p.add_argument("--runner", default=env("LLMEXEC_RUNNER_ADDRESS", "127.0.0.1:50053"),
                   help="runner address; several, comma-separated, serve as data-parallel replicas")
    p.add_argument("--loader", default=env("LLMEXEC_LOADER_ADDRESS", "127.0.0.1:50052"),
                   help="where the tokenizer comes from")
    p.add_argument("--redis-url", default=env("LLMEXEC_REDIS_URL", "embedded"),
                   help='redis://host:port/db, or "embedded" to start a private redis-server')
    p.add_argument("--max-num-seqs", type=int, default=int(env("LLMEXEC_MAX_NUM_SEQS", "64")))
    p.add_argument("--max-num-batched-tokens", type=int, default=int(env("LLMEXEC_MAX_NUM_BATCHED_TOKENS", "4096")))
    p.add_argument("--max-model-len", type=int, default=int(env("LLMEXEC_MAX_MODEL_LEN", "0")),
                   help="0: the model's context, capped by the KV cache size")
    p.add_argument("--max-queue-len", type=int, default=int(env("LLMEXEC_MAX_QUEUE_LEN", "1024")),
                   help="waiting requests per runner before new ones get RESOURCE_EXHAUSTED; 0: no limit")
    p.add_argument("--no-prefix-caching", action="store_true",
                   default=env("LLMEXEC_PREFIX_CACHING", "1") in ("0", "false", "no"))
    p.add_argument("--no-async-scheduling", action="store_true",
                   default=env("LLMEXEC_ASYNC_SCHEDULING", "1") in ("0", "false", "no"),
                   help="plan each step only after the previous one's tokens are back (default: plan the next "
                        "decode step while one runs)")
    p.add_argument("--metrics-port", type=int, default=int(env("LLMEXEC_METRICS_PORT", "0")),
                   help="Prometheus /metrics over HTTP; 0 picks a free port (GetServerInfo tells it), -1: off")
    p.add_argument("--metrics-host", default=env("LLMEXEC_METRICS_HOST", "127.0.0.1"))
    p.add_argument("--redis-prefix", default=env("LLMEXEC_REDIS_PREFIX", "llmexec"),
                   help="key prefix of this scheduler's state in Redis")
    p.add_argument("--redis-password-file", default=env("LLMEXEC_REDIS_PASSWORD_FILE", ""),
                   help="file holding the Redis password (a mounted Secret)")
    p.add_argument("--api-token-file", default=env("LLMEXEC_API_TOKEN_FILE", ""),
                   help="require 'authorization: Bearer <token in this file>' on SchedulerService calls "
                        "(or set LLMEXEC_API_TOKEN); health and reflection stay open")
    p.add_argument("--log-level", default=env("LLMEXEC_LOG_LEVEL", "INFO"))
    add_transport_args(p, "scheduler")
    return p.parse_args(argv)


def eos_ids_from_config(config: dict, tokenizer: Tokenizer | None) -> set[int]:
    eos = config.get("eos_token_id")
    ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


async def amain(args: argparse.Namespace) -> None:
    service = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
    runner_service = runner_pb2.DESCRIPTOR.services_by_name["RunnerService"].full_name
    transport = transport_from_args(args)
    api_token = read_token(args.api_token_file, os.environ.get("LLMEXEC_API_TOKEN", ""))
    embedded = None
    redis_url = args.redis_url
    if redis_url == "embedded":
        embedded = EmbeddedRedis()
        embedded.start()
        redis_url = embedded.url
    try:
        connected = await connect_runners(
            parse_addresses(args.runner),
            lambda address: aio_channel(address, transport.client_tls),
            lambda address: wait_until_serving(address, runner_service, timeout=900, tls=transport.client_tls),
        )
        info = connected[0][1]
        model = info.model_info
        tokenizer = None
        if model.has_tokenizer:
            async with aio_channel(args.loader, transport.client_tls) as channel:
                files = await loader_pb2_grpc.LoaderServiceStub(channel).GetTokenizer(
                    loader_pb2.GetTokenizerRequest(model_id=model.model_id), timeout=60
                )
            tokenizer = Tokenizer(dict(files.files))
        config = json.loads(model.config_json)
        max_model_len = min([model.max_model_len] + [i.num_blocks * i.block_size for _, i in connected])
        if args.max_model_len:
            max_model_len = min(max_model_len, args.max_model_len)
        sched_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_waiting=args.max_queue_len,
            enable_prefix_caching=not args.no_prefix_caching,
        )
        replicas = build_replicas(connected, sched_config, max_model_len, eos_ids_from_config(config, tokenizer))
        store = SequenceStore(connect_redis(redis_url, read_password_file(args.redis_password_file)),
                              prefix=args.redis_prefix)
        engine = Engine(replicas, store, tokenizer, model_name=model.model_id,
                        async_scheduling=not args.no_async_scheduling)
        engine.recover()  # unfinished sequences of an earlier scheduler, before any client can ask
        if args.metrics_port >= 0:
            log.info("metrics on http://%s:%d/metrics", args.metrics_host,
                     engine.metrics.serve(args.metrics_port, args.metrics_host))
        servicer = SchedulerServicer(engine, model.model_id, model.architecture, max_model_len, model.vocab_size)
        running = await start_server(
            [(scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, servicer)], [service], args.host, args.port,
            tls=transport.server_tls, health_port=transport.health_port,
            interceptors=[BearerTokenInterceptor(api_token, [service])] if api_token else [],
        )
        engine.start()
        await running.set_serving(True)
        log.info("scheduler serving %s on %s:%d (redis %s)", model.model_id, args.host, running.port,
                 redact(redis_url))
        await serve_until_signalled(running, transport.drain_seconds)
        await engine.stop()
        for replica in replicas:
            await replica.client.close()
    finally:
        if embedded is not None:
            embedded.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
