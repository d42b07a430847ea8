"""The serving loop: one step loop per runner, streams to clients, state in Redis.

Each replica (a runner and the Scheduler owning its KV cache) has an asyncio
task that schedules a step, runs it on its runner, applies the result, saves
every changed sequence to Redis in one pipeline, and only then hands the new
tokens to the clients' queues, so what a client has seen is always stored.
Request handlers only add requests and read their own queue.

Failures:
- a runner that goes away or restarts (RunnerLost): its sequences go back to
  waiting with nothing computed (and to another runner when one is up), the
  loop waits for the runner to answer again, and the KV cache is recomputed
  from the tokens;
- a scheduler that dies: the next one calls recover() before serving, which
  reloads every unfinished sequence from Redis and schedules it again; clients
  reconnect with ResumeGenerate(request_id, offset);
- Redis unreachable: the step's results wait (and retry) until they are stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque

import redis

from llmexec.errors import InvalidArgumentError, NotFoundError, UnavailableError
from llmexec.scheduler.metrics import EngineMetrics
from llmexec.scheduler.replica import Replica
from llmexec.scheduler.request_state import END, Completion, RequestStream, StreamChunk
from llmexec.scheduler.router import choose_replica
from llmexec.scheduler.runner_client import RunnerLost
from llmexec.scheduler.scheduler import ScheduledStep
from llmexec.scheduler.sequence import Sequence
from llmexec.scheduler.state_store import SequenceStore
from llmexec.scheduler.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STORE_RETRY_S = 0.5


class Engine:
    def __init__(self, replicas: list[Replica], store: SequenceStore, tokenizer: Tokenizer | None,
                 model_name: str = "", async_scheduling: bool = True) -> None:
        if not replicas:
            raise InvalidArgumentError("the engine needs at least one runner")
        self.replicas = replicas
        self.store = store
        self.tokenizer = tokenizer
        self.async_scheduling = async_scheduling  # plan the next decode step while one runs (scheduler.py)
        self.requests: dict[str, RequestStream] = {}  # unfinished, by the client's request id
        self.metrics = EngineMetrics(model_name, self.snapshot)
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle

    def start(self) -> None:
        """Start one step loop per replica (call recover() first after a restart)."""
        self._tasks = [asyncio.create_task(self._run(r), name=f"llmexec-step-{r.address}") for r in self.replicas]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.metrics.close()

    def recover(self) -> int:
        """Reload every unfinished sequence from Redis and queue it again, with nothing
        computed. Returns how many. Their clients reconnect with resume()."""
        by_group: dict[str, list[Sequence]] = defaultdict(list)
        for seq in self.store.load_active():
            by_group[seq.group_id].append(seq)
        recovered = []
        for group_id, active in by_group.items():
            seqs = self.store.load_request(group_id) if active[0].sampling_params.n > 1 else active
            seqs = sorted({s.request_id: s for s in seqs + active}.values(), key=lambda s: s.index)
            unfinished = [s for s in seqs if not s.is_finished]
            replica = choose_replica(self.replicas, unfinished[0], len(unfinished), force=True)
            for seq in unfinished:
                seq.block_table, seq.num_computed_tokens = [], 0
                replica.scheduler.add(seq, force=True)
                replica.num_routed += 1
            self.requests[group_id] = RequestStream(
                group_id, [Completion.start(s, self.tokenizer) for s in seqs], replica
            )
            recovered += unfinished
        self.store.save_step(recovered)
        self.metrics.recovered.inc(len(recovered))
        for replica in self.replicas:
            replica.work.set()
        if recovered:
            log.info("recovered %d unfinished sequences of %d requests from Redis", len(recovered), len(by_group))
        return len(recovered)

    # -- what request handlers call

    def add(self, seqs: list[Sequence], stream_interval: int = 1) -> asyncio.Queue:
        """Queue a request's completions (validated sequences sharing one group_id);
        returns the queue their StreamChunks arrive on, END after the last. Each chunk
        carries stream_interval new tokens (fewer with a completion's last)."""
        group_id = seqs[0].group_id
        if group_id in self.requests:
            raise InvalidArgumentError(f"request_id {group_id!r} is already in flight")
        replica = choose_replica(self.replicas, seqs[0], len(seqs))
        added = []
        try:
            for seq in seqs:
                replica.scheduler.add(seq)  # validates before anything is recorded
                added.append(seq)
            self.store.save_step(seqs)
        except Exception:
            for seq in added:
                replica.scheduler.abort(seq.request_id)
            raise
        replica.num_routed += len(seqs)
        stream = RequestStream(group_id, [Completion.start(s, self.tokenizer) for s in seqs], replica,
                               stream_interval=max(1, stream_interval))
        queue: asyncio.Queue = asyncio.Queue()
        stream.subscribers.append(queue)
        self.requests[group_id] = stream
        self.metrics.prompt_tokens.inc(sum(s.num_prompt_tokens for s in seqs))
        replica.work.set()
        return queue

    def resume(self, group_id: str, offset: int) -> tuple[list[StreamChunk], asyncio.Queue | None]:
        """The chunks of a request from output token `offset` on, and, while it runs,
        a queue of the chunks to come (None once it has finished)."""
        if offset < 0:
            raise InvalidArgumentError(f"offset must be >= 0, got {offset}")
        stream = self.requests.get(group_id)
        if stream is not None:
            completions = stream.completions
        else:
            seqs = self.store.load_request(group_id)
            if not seqs:
                raise NotFoundError(f"no request {group_id!r} is running or finished within the last hour")
            if not all(s.is_finished for s in seqs):
                raise UnavailableError(f"request {group_id!r} is being recovered; retry shortly")
            completions = [Completion.start(s, self.tokenizer) for s in seqs]
        generated = max(c.num_delivered for c in completions)
        if offset > generated:
            raise InvalidArgumentError(f"offset {offset} is past the {generated} tokens generated so far")
        chunks = [c.chunk_from(offset) for c in completions]
        self.metrics.resumed.inc()
        if stream is None:
            return chunks, None
        queue: asyncio.Queue = asyncio.Queue()
        stream.subscribers.append(queue)  # no await since the snapshot: nothing is missed
        return chunks, queue

    def unsubscribe(self, group_id: str, queue: asyncio.Queue) -> None:
        stream = self.requests.get(group_id)
        if stream is not None and queue in stream.subscribers:
            stream.subscribers.remove(queue)

    def abort(self, group_id: str) -> None:
        """Finish a request whose client went away and free its blocks.

        Safe while a step runs: its blocks are only reused by the next schedule(),
        after that step has returned, and update() skips finished sequences."""
        stream = self.requests.pop(group_id, None)
        if stream is None:
            return
        aborted = [s for s in (stream.replica.scheduler.abort(c.seq.request_id) for c in stream.completions) if s]
        try:
            self.store.save_step(aborted)
        except redis.RedisError as exc:
            log.error("could not record the abort of %s: %s", group_id, exc)
        for completion in stream.completions:
            if completion.seq in aborted:
                chunk = StreamChunk(index=completion.seq.index)
                completion.finish(chunk)
                stream.publish(chunk)
        stream.publish(END)

    # -- state, for GetServerInfo and metrics

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    @property
    def num_running(self) -> int:
        return sum(r.scheduler.num_running for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.scheduler.num_waiting for r in self.replicas)

    def snapshot(self) -> dict:
        return {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "runners": [
                {
                    "address": r.address,
                    "healthy": 1.0 if r.healthy else 0.0,
                    "num_blocks": r.block_manager.num_blocks,
                    "used_blocks": r.block_manager.num_used_blocks,
                    "free_blocks": r.block_manager.num_free_blocks,
                    "running": r.scheduler.num_running,
                    "waiting": r.scheduler.num_waiting,
                    "routed": r.num_routed,
                    "hits": r.num_hit_tokens,
                    "queries": r.num_queried_tokens,
                    "preemptions": r.scheduler.num_preemptions,
                    "recoveries": r.num_recoveries,
                }
                for r in self.replicas
            ],
        }

    # -- the step loop

    async def _run(self, replica: Replica) -> None:
        """Schedule, execute, update. Two kinds of overlap keep the runner busy: each step's
        results are stored and delivered while the runner computes the next, and (async
        scheduling) the next decode step is planned and sent before this one's tokens are
        back, so the runner starts it as soon as it finishes this one."""
        scheduler = replica.scheduler
        pending: tuple[ScheduledStep, list[Sequence], float] | None = None  # updated, not yet stored
        in_flight: deque[tuple[ScheduledStep, asyncio.Future, float]] = deque()  # sent, in order
        while True:
            if not in_flight:
                if pending is not None and not (replica.healthy and scheduler.has_unfinished()):
                    await self._publish(replica, *pending)
                    pending = None
                if not replica.healthy:
                    await replica.wait_for_runner()
                    continue
                if not scheduler.has_unfinished():
                    replica.work.clear()
                    await replica.work.wait()
                    continue
                step = scheduler.schedule()
                if step is None:
                    # Nothing fits this step (should not happen with a validated
                    # prompt); yield so aborts and new requests can arrive.
                    if pending is not None:
                        await self._publish(replica, *pending)
                        pending = None
                    await asyncio.sleep(0.005)
                    continue
                in_flight.append(self._send(replica, step))
            if self.async_scheduling and len(in_flight) == 1:
                ahead = scheduler.schedule_ahead(in_flight[0][0])
                if ahead is not None:
                    in_flight.append(self._send(replica, ahead))
                    self.metrics.steps_ahead.inc()
            if pending is not None:
                await asyncio.sleep(0)  # the steps just sent leave before the publishing below
                # A stop string found here finishes a sequence a step in flight computes;
                # update() skips it, and its blocks are reused only by steps sent later.
                await self._publish(replica, *pending)
                pending = None
            step, execution, started = in_flight.popleft()
            try:
                output = await execution
            except RunnerLost as exc:
                log.warning("%s; recomputing its sequences", exc)
                await self._settle(in_flight)
                await self._runner_lost(replica)
                continue
            except Exception as exc:  # noqa: BLE001 - the runner refused the step: fail its requests, keep serving
                log.error("step failed on %s: %s", replica.address, exc)
                await self._settle(in_flight)  # a step planned after it continues it: it fails too
                self._fail(step, exc)
                continue
            pending = (step, scheduler.update(step, output), started)

    def _send(self, replica: Replica, step: ScheduledStep) -> tuple[ScheduledStep, asyncio.Future, float]:
        step.step_input.runner_instance_id = replica.instance_id
        return step, replica.client.send(step.step_input), time.perf_counter()

    @staticmethod
    async def _settle(in_flight: deque) -> None:
        """Wait out the steps sent after one that failed; their results are dropped (the
        failure's handling recomputes or fails their sequences)."""
        while in_flight:
            _, execution, _ = in_flight.popleft()
            try:
                await execution
            except Exception:  # noqa: BLE001, S110 - already handled through the first failure
                pass

    async def _publish(self, replica: Replica, step: ScheduledStep, touched: list[Sequence], started: float) -> None:
        """Texts and stop strings of an updated step, then store it, then deliver: a client
        sees only what Redis holds."""
        chunks = self._texts_and_stops(replica, touched)
        await self._save(step.sequences + step.preempted)
        self._deliver(chunks)
        self._observe_step(replica, step, time.perf_counter() - started)

    def _texts_and_stops(self, replica: Replica, touched: list[Sequence]) -> list[tuple[RequestStream, StreamChunk]]:
        """Each touched sequence's new token as a chunk: its text, stop strings
        (which finish the sequence), timings."""
        now = time.time()
        chunks = []
        for seq in touched:
            stream = self.requests.get(seq.group_id)
            if stream is None:
                continue
            completion = stream.completions[seq.index]
            token_id = seq.output_token_ids[-1]
            detok = completion.detokenizer
            text = completion.text_of(token_id, seq.num_output_tokens, final=seq.is_finished)
            if detok is not None and detok.stopped:
                replica.scheduler.finish(seq.request_id, "stop")  # also turns a "length" finish into "stop"
            completion.texts.append(text)
            chunk = StreamChunk(index=seq.index, token_ids=[token_id], text=text,
                                logprobs=seq.output_logprobs[-1:] if seq.sampling_params.logprobs is not None else [])
            self._observe_token(completion, now)
            if seq.is_finished:
                completion.finish(chunk)
                self.metrics.e2e.observe(now - seq.arrival_time)
                self.metrics.request_success.labels(self.metrics.model_name, seq.finish_reason).inc()
            chunks.append((stream, chunk))
        self.metrics.generation_tokens.inc(len(chunks))
        return chunks

    def _deliver(self, chunks: list[tuple[RequestStream, StreamChunk]]) -> None:
        done = []
        for stream, chunk in chunks:
            completion = stream.completions[chunk.index]
            chunk = completion.release(chunk, stream.stream_interval)
            if chunk is None:
                continue
            completion.num_delivered += len(chunk.token_ids)
            stream.publish(chunk)
            if chunk.finish_reason is not None and stream.finished:
                done.append(stream)
        for stream in done:
            stream.publish(END)
            self.requests.pop(stream.group_id, None)

    async def _save(self, seqs: list[Sequence]) -> None:
        """Store the sequences' changes; on a Redis error, retry until it takes them."""
        while True:
            started = time.perf_counter()
            try:
                # In a thread: the event loop meanwhile takes the runner's replies and sends
                # requests. Nothing changes these sequences until this returns, but an abort
                # (SequenceStore serializes its writes).
                await asyncio.to_thread(self.store.save_step, seqs)
                self.metrics.store_seconds.observe(time.perf_counter() - started)
                return
            except redis.RedisError as exc:
                log.error("Redis write failed (%s); the step's tokens wait until it is back", exc)
                await asyncio.sleep(STORE_RETRY_S)

    async def _runner_lost(self, replica: Replica) -> None:
        replica.healthy = False
        replica.num_recoveries += 1
        preempted = replica.scheduler.reset()
        others = [r for r in self.replicas if r is not replica and r.healthy]
        if others:
            self._move_all(replica, others)
        await self._save(preempted)

    def _move_all(self, source: Replica, targets: list[Replica]) -> None:
        """Route source's sequences (holding no blocks) to the other replicas."""
        by_group: dict[str, list[Sequence]] = defaultdict(list)
        for seq in source.scheduler.remove_all():
            by_group[seq.group_id].append(seq)
        for group_id, seqs in by_group.items():
            target = choose_replica(targets, seqs[0], len(seqs), force=True)
            for seq in seqs:
                target.scheduler.add(seq, force=True)
            target.num_routed += len(seqs)
            stream = self.requests.get(group_id)
            if stream is not None:
                stream.replica = target
            target.work.set()

    def _fail(self, step: ScheduledStep, exc: Exception) -> None:
        error = UnavailableError(f"the runner failed to execute a step: {exc}")
        for group_id in {seq.group_id for seq in step.sequences}:
            stream = self.requests.pop(group_id, None)
            if stream is None:
                continue
            aborted = [s for s in (stream.replica.scheduler.abort(c.seq.request_id) for c in stream.completions) if s]
            self.store.save_step(aborted)
            stream.publish(error)

    def _observe_token(self, completion: Completion, now: float) -> None:
        if completion.last_token_time is not None:
            self.metrics.itl.observe(now - completion.last_token_time)
        elif completion.seq.num_output_tokens == 1:  # not a sequence recovered mid-generation
            self.metrics.ttft.observe(now - completion.seq.arrival_time)
        completion.last_token_time = now

    def _observe_step(self, replica: Replica, step: ScheduledStep, seconds: float) -> None:
        m = self.metrics
        m.step_seconds.observe(seconds)
        m.step_tokens.observe(step.num_tokens)
        bm = replica.block_manager
        m.kv_slots_allocated.inc(bm.num_used_blocks * bm.block_size)
        m.kv_slots_empty.inc(bm.num_empty_slots(replica.scheduler.running))
