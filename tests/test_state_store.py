"""SequenceStore against a real redis-server (started by EmbeddedRedis)."""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from llmexec.redis_server import EmbeddedRedis
from llmexec.sampling_params import SamplingParams
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.scheduler import Scheduler
from llmexec.scheduler.sequence import Sequence, SequenceStatus
from llmexec.scheduler.state_store import SequenceStore


class CountingConnection(redis.Connection):
    """A real connection that counts what it sends: one send is one round trip."""

    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(params=[True, False], ids=["str", "bytes"])
def client(server, request):
    pool = redis.ConnectionPool.from_url(
        server.url, connection_class=CountingConnection, decode_responses=request.param
    )
    client = redis.Redis(connection_pool=pool)
    client.ping()  # connect now, so the counts below are the store's own
    yield client
    pool.disconnect()


@pytest.fixture
def store(client):
    return SequenceStore(client, prefix=f"test-{uuid.uuid4().hex[:8]}")


def round_trips(fn, *args):
    before = CountingConnection.sends
    result = fn(*args)
    return result, CountingConnection.sends - before


def test_embedded_redis_is_a_real_server(server):
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    assert server.url.startswith("redis://127.0.0.1:") and server.pid > 0
    assert client.config_get("save") == {"save": ""}


def test_embedded_redis_detached_runs_in_its_own_session(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path, appendonly=True, detach=True).start()
    try:
        assert os.getsid(server.pid) == server.pid  # survives its starter's terminal session
        redis.Redis.from_url(server.url).set("k", "v")
    finally:
        server.stop()
    assert (tmp_path / "redis.log").exists()  # a caller-given folder is kept
    assert not server.ping()


def test_save_and_load_roundtrip(store):
    params = SamplingParams(temperature=0.7, top_k=5, max_tokens=9, seed=11, stop=("é🤖", "\n"), stop_token_ids=(3,))
    seq = Sequence("req-1", [5, 6, 7], [8, 9], params, SequenceStatus.RUNNING, [3, 0], 4, 1234.5)
    store.save(seq)
    loaded, trips = round_trips(store.load, "req-1")
    assert trips == 1
    assert loaded.to_record() == seq.to_record()
    assert loaded.sampling_params == params
    assert store.load("missing") is None
    assert store.active_ids() == {"req-1"}


def test_each_step_is_one_round_trip_and_loads_back_equal(store, client):
    scheduler = Scheduler(BlockManager(32, 4), max_model_len=64, eos_token_ids={2})
    seqs = [
        Sequence(f"r{i}", list(range(10, 15 + i)), sampling_params=SamplingParams(max_tokens=3 + i)) for i in range(4)
    ]
    store.save(seqs[0])  # the others reach Redis through save_step
    for seq in seqs:
        scheduler.add(seq)
    num_steps = 0
    while scheduler.has_unfinished():
        step = scheduler.schedule()
        touched = scheduler.update(step, [100 + num_steps] * len(step.sequences))
        _, trips = round_trips(store.save_step, touched)
        assert trips == 1
        num_steps += 1
        for seq in touched:
            assert store.load(seq.request_id).to_record() == seq.to_record()
        assert store.active_ids() == {s.request_id for s in seqs if not s.is_finished}
    assert num_steps == 6
    assert client.llen(store.output_key("r3")) == 6  # one RPUSH per token, no duplicates
    _, trips = round_trips(store.save_step, [])
    assert trips == 0


def test_finished_sequences_expire_and_leave_the_active_set(store, client):
    running = Sequence("run", [1, 2], [3], status=SequenceStatus.RUNNING, block_table=[0], num_computed_tokens=2)
    done = Sequence("done", [1, 2], [3, 4], status=SequenceStatus.RUNNING, block_table=[1], num_computed_tokens=3)
    store.save_step([running, done])
    assert store.active_ids() == {"run", "done"}
    assert client.ttl(store.seq_key("done")) == -1  # no expiry while it runs

    done.output_token_ids.append(5)
    done.status = SequenceStatus.FINISHED_STOPPED
    done.block_table.clear()
    store.save_step([done])
    assert store.active_ids() == {"run"}
    for key in (store.seq_key("done"), store.output_key("done")):
        assert 0 < client.ttl(key) <= 3600
    loaded = store.load("done")
    assert loaded.finish_reason == "stop" and loaded.output_token_ids == [3, 4, 5]

    aborted = Sequence("gone", [9], status=SequenceStatus.FINISHED_ABORTED)  # finished before any token
    store.save(aborted)
    assert 0 < client.ttl(store.seq_key("gone")) <= 3600
    assert store.active_ids() == {"run"}


def test_load_active_after_a_restart_continues_the_record(store, client):
    seqs = [Sequence(f"a{i}", [i, i + 1], [7], status=SequenceStatus.RUNNING, arrival_time=100.0 - i) for i in range(3)]
    store.save_step(seqs)
    store.delete("a1")
    assert store.load("a1") is None and store.active_ids() == {"a0", "a2"}

    restarted = SequenceStore(client, prefix=store.prefix)
    loaded = restarted.load_active()
    assert [s.request_id for s in loaded] == ["a2", "a0"]  # oldest first
    loaded[0].output_token_ids.append(8)
    _, trips = round_trips(restarted.save_step, loaded)
    assert trips == 1
    assert store.load("a2").output_token_ids == [7, 8]
    assert store.load("a0").output_token_ids == [7]


def test_completions_of_one_request_and_their_logprobs(store, client):
    from llmexec.scheduler.sequence import completion_id
    from llmexec.step import TokenLogprobs

    params = SamplingParams(n=2, logprobs=1, seed=3)
    seqs = [Sequence(completion_id("grp", i, 2), [1, 2, 3], sampling_params=params.for_completion(i), group_id="grp",
                     index=i, priority=-2) for i in range(2)]
    store.save_step(seqs)
    seqs[1].output_token_ids.append(9)
    seqs[1].output_logprobs.append(TokenLogprobs(9, -0.5, 2, [4], [-0.1]))
    store.save_step(seqs)
    assert client.llen(store.logprobs_key("grp#1")) == 1 and client.llen(store.logprobs_key("grp#0")) == 0
    loaded = store.load_request("grp")
    assert [s.to_record() for s in loaded] == [s.to_record() for s in seqs]
    assert loaded[1].output_logprobs[0].top_logprobs == [-0.1] and loaded[0].priority == -2
    store.save(Sequence("solo", [5]))
    assert [s.request_id for s in store.load_request("solo")] == ["solo"]
    assert store.load_request("nobody") == []


def commands_run(client) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def test_a_steady_decode_step_costs_one_command_per_sequence(store, client):
    """Only the new token is pushed; the hash and the active set are written when the state changes
    (a new block, finishing), and what loads back still equals the sequence."""
    scheduler = Scheduler(BlockManager(64, 4), max_model_len=64, eos_token_ids=set())
    seqs = [Sequence(f"d{i}", [10, 11, 12], sampling_params=SamplingParams(max_tokens=6, ignore_eos=True))
            for i in range(8)]
    for seq in seqs:
        scheduler.add(seq)
    step = scheduler.schedule()
    store.save_step(scheduler.update(step, [5] * len(step.sequences)))  # prefill: full records
    per_step = []
    while scheduler.has_unfinished():
        step = scheduler.schedule()
        touched = scheduler.update(step, [6] * len(step.sequences))
        before = commands_run(client)
        store.save_step(touched)
        after = commands_run(client)
        ran = {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}
        ran.pop("info", None)
        per_step.append((len(touched[0].block_table), touched[0].is_finished, ran))
        for seq in touched:
            assert store.load(seq.request_id).to_record() == seq.to_record()
    # 3 prompt tokens, blocks of 4: tokens 4..8 are computed over the 5 decode steps.
    steady = [ran for blocks, finished, ran in per_step[:-1] if ran.get("hset") is None]
    assert steady and all(ran == {"multi": 1, "rpush": 8, "exec": 1} for ran in steady)
    assert any(ran.get("hset") == 8 and "sadd" not in ran for _, _, ran in per_step[:-1])  # a new block each
    assert per_step[-1][1] and per_step[-1][2]["srem"] == 8  # finishing leaves the active set
    assert store.active_ids().isdisjoint(s.request_id for s in seqs)
