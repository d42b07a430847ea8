"""Connect the scheduler to its runners and build one replica per runner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import grpc

from llmexec.errors import FailedPreconditionError
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.replica import Replica, SchedulerConfig
from llmexec.scheduler.runner_client import RunnerClient
from llmexec.scheduler.scheduler import Scheduler
from llmexec.v1 import runner_pb2


def parse_addresses(value: str) -> list[str]:
    """"host:port[,host:port...]" -> the addresses, in order, without duplicates."""
    addresses = list(dict.fromkeys(a.strip() for a in value.split(",") if a.strip()))
    if not addresses:
        raise FailedPreconditionError("no runner address given (--runner host:port[,host:port...])")
    return addresses


async def connect_runners(
    addresses: list[str],
    channel_factory: Callable[[str], grpc.aio.Channel],
    wait_serving: Callable[[str], Awaitable[None]],
) -> list[tuple[RunnerClient, runner_pb2.GetRunnerInfoResponse]]:
    """Wait until every runner serves; check that they serve the same model."""
    connected = []
    for address in addresses:
        await wait_serving(address)
        client = RunnerClient(address, channel_factory)
        connected.append((client, await client.info()))
    first = connected[0][1].model_info
    for client, info in connected[1:]:
        if (info.model_info.model_id, info.model_info.vocab_size) != (first.model_id, first.vocab_size):
            raise FailedPreconditionError(
                f"runner {client.address} serves {info.model_info.model_id!r}, "
                f"runner {connected[0][0].address} serves {first.model_id!r}: one scheduler serves one model"
            )
    return connected


def build_replicas(
    connected: list[tuple[RunnerClient, runner_pb2.GetRunnerInfoResponse]],
    config: SchedulerConfig,
    max_model_len: int,
    eos_token_ids: Iterable[int],
) -> list[Replica]:
    replicas = []
    for client, info in connected:
        scheduler = Scheduler(
            BlockManager(info.num_blocks, info.block_size, config.enable_prefix_caching),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids,
            max_num_waiting=config.max_num_waiting,
        )
        replicas.append(Replica(client=client, scheduler=scheduler, instance_id=info.instance_id))
    return replicas
