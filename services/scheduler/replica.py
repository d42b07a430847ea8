"""One runner and the Scheduler that owns its KV cache (one data-parallel replica).

Each replica has its own block manager and prefix cache, because each runner
has its own KV cache; the engine runs one step loop per replica.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.runner_client import RunnerClient
from llmexec.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

RECONNECT_INTERVAL_S = 0.5


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_num_waiting: int = 0  # per replica; 0: no limit
    enable_prefix_caching: bool = True


@dataclass
class Replica:
    client: RunnerClient
    scheduler: Scheduler
    instance_id: str = ""
    healthy: bool = True
    num_routed: int = 0  # sequences routed here
    num_recoveries: int = 0
    # Prefix-cache counters of block managers this replica replaced.
    _past_queried: int = 0
    _past_hits: int = 0
    work: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return self.client.address

    @property
    def block_manager(self) -> BlockManager:
        return self.scheduler.block_manager

    @property
    def num_queried_tokens(self) -> int:
        return self._past_queried + self.block_manager.num_queried_tokens

    @property
    def num_hit_tokens(self) -> int:
        return self._past_hits + self.block_manager.num_hit_tokens

    @property
    def load(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting

    async def wait_for_runner(self, timeout_per_try: float = 2.0) -> None:
        """Until the runner answers: reconnect, read its geometry and instance id.

        A runner that came back with another cache size gets a new block manager
        (the scheduler must hold no blocks then)."""
        attempt = 0
        while True:
            try:
                if attempt:
                    await self.client.reconnect()
                info = await self.client.info(timeout=timeout_per_try)
                break
            except Exception as exc:  # noqa: BLE001 - any failure means: not back yet
                if attempt % 20 == 0:
                    log.warning("waiting for runner %s: %s", self.address, exc)
                attempt += 1
                await asyncio.sleep(RECONNECT_INTERVAL_S)
        bm = self.block_manager
        if (info.num_blocks, info.block_size) != (bm.num_blocks, bm.block_size):
            assert bm.num_used_blocks == 0, "resizing a KV cache that still holds blocks"
            self._past_queried += bm.num_queried_tokens
            self._past_hits += bm.num_hit_tokens
            self.scheduler.block_manager = BlockManager(info.num_blocks, info.block_size, bm.enable_prefix_caching)
        self.instance_id = info.instance_id
        self.healthy = True
        log.info("runner %s is serving (instance %s, %d blocks)", self.address, info.instance_id, info.num_blocks)
