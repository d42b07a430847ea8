"""`python -m llmexec.scheduler --port 50051 --runner ... --loader ...`: run the scheduler alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os

import redis

from llmexec.redis_server import EmbeddedRedis
from llmexec.rpc.client import aio_channel, wait_until_serving
from llmexec.rpc.codec import step_to_pb
from llmexec.rpc.server import configure_logging, serve_until_signalled, start_server
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.engine import Engine
from llmexec.scheduler.scheduler import Scheduler
from llmexec.scheduler.server import SchedulerServicer
from llmexec.scheduler.state_store import SequenceStore
from llmexec.scheduler.tokenizer import Tokenizer
from llmexec.step import StepInput
from llmexec.v1 import loader_pb2, loader_pb2_grpc, runner_pb2, runner_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("llmexec.scheduler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m llmexec.scheduler", description=__doc__)
    p.add_argument("--host", default=env("LLMEXEC_SCHEDULER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("LLMEXEC_SCHEDULER_PORT", "50051")))
    p.add_argument("--runner", default=env("LLMEXEC_RUNNER_ADDRESS", "127.0.0.1:50053"))
    p.add_argument("--loader", default=env("LLMEXEC_LOADER_ADDRESS", "127.0.0.1:50052"),
                   help="where the tokenizer comes from")
    p.add_argument("--redis-url", default=env("LLMEXEC_REDIS_URL", "embedded"),
                   help='redis://host:port/db, or "embedded" to start a private redis-server')
    p.add_argument("--max-num-seqs", type=int, default=int(env("LLMEXEC_MAX_NUM_SEQS", "64")))
    p.add_argument("--max-num-batched-tokens", type=int, default=int(env("LLMEXEC_MAX_NUM_BATCHED_TOKENS", "4096")))
    p.add_argument("--max-model-len", type=int, default=int(env("LLMEXEC_MAX_MODEL_LEN", "0")),
                   help="0: the model's context, capped by the KV cache size")
    p.add_argument("--log-level", default=env("LLMEXEC_LOG_LEVEL", "INFO"))
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
    embedded = None
    redis_url = args.redis_url
    if redis_url == "embedded":
        embedded = EmbeddedRedis()
        embedded.start()
        redis_url = embedded.url
    try:
        await wait_until_serving(args.runner, runner_service, timeout=900)
        runner_channel = aio_channel(args.runner)
        runner = runner_pb2_grpc.RunnerServiceStub(runner_channel)
        info = await runner.GetRunnerInfo(runner_pb2.GetRunnerInfoRequest(), timeout=30)
        model = info.model_info
        tokenizer = None
        if model.has_tokenizer:
            async with aio_channel(args.loader) as channel:
                files = await loader_pb2_grpc.LoaderServiceStub(channel).GetTokenizer(
                    loader_pb2.GetTokenizerRequest(model_id=model.model_id), timeout=60
                )
            tokenizer = Tokenizer(dict(files.files))
        config = json.loads(model.config_json)
        max_model_len = min(model.max_model_len, info.num_blocks * info.block_size)
        if args.max_model_len:
            max_model_len = min(max_model_len, args.max_model_len)

        async def execute_step(step: StepInput) -> list[int]:
            reply = await runner.ExecuteStep(step_to_pb(step), timeout=600)
            return list(reply.sampled_token_ids)

        scheduler = Scheduler(
            BlockManager(info.num_blocks, info.block_size),
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=eos_ids_from_config(config, tokenizer),
        )
        store = SequenceStore(redis.Redis.from_url(redis_url))
        engine = Engine(scheduler, store, execute_step, tokenizer)
        servicer = SchedulerServicer(engine, model.model_id, model.architecture, max_model_len, model.vocab_size)
        running = await start_server(
            [(scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, servicer)], [service], args.host, args.port
        )
        engine.start()
        await running.set_serving(True)
        log.info("scheduler serving %s on %s:%d (redis %s)", model.model_id, args.host, running.port, redis_url)
        await serve_until_signalled(running)
        await engine.stop()
        await runner_channel.close()
    finally:
        if embedded is not None:
            embedded.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
