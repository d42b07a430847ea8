"""Continuous batching, checked the way a runner would see it.

FakeRunner plays the model: it writes every query token into a KV "cache" at
its slot, then computes the next token from what it reads back through the
sequence's block table. A wrong slot, a block wrongly shared by two live
sequences, a prefix-cache hit on a block holding other tokens or a stale block
after preemption changes the tokens, so comparing each request's output with
`reference` (the same function on the plain token list) checks the scheduler
end to end.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmexec.errors import InvalidArgumentError, ResourceExhaustedError
from llmexec.runner.block_tables import BlockTables
from llmexec.sampling_params import SamplingParams
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.scheduler import Scheduler
from llmexec.scheduler.sequence import Sequence, SequenceStatus
from llmexec.step import StepInput

EOS = 2


def next_token(context: list[int]) -> int:
    h = 0
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return 10 + h % 1000  # never EOS unless a test asks for it


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeRunner:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.kv: dict[int, int] = {}
        self.steps: list[StepInput] = []
        self.tables = BlockTables()  # the runner's: steps carry only the blocks the runner lacks

    def slot(self, block_table: list[int], p: int) -> int:
        return block_table[p // self.block_size] * self.block_size + p % self.block_size

    def execute(self, step: StepInput) -> list[int]:
        assert len(step.input_ids) == len(step.positions) == len(step.slot_mapping)
        assert sum(s.query_len for s in step.sequences) == step.num_tokens
        self.steps.append(step)
        self.tables.resolve(step)
        sampled, row = [], 0
        for s in step.sequences:
            assert len(s.block_table) * self.block_size >= s.seq_len
            assert step.positions[row : row + s.query_len] == list(range(s.seq_len - s.query_len, s.seq_len))
            for r in range(row, row + s.query_len):
                assert step.slot_mapping[r] == self.slot(s.block_table, step.positions[r])
                self.kv[step.slot_mapping[r]] = step.input_ids[r]
            row += s.query_len
            if s.needs_sample:
                sampled.append(next_token([self.kv[self.slot(s.block_table, p)] for p in range(s.seq_len)]))
        return sampled


def make_scheduler(num_blocks=64, block_size=16, max_model_len=256, **kw) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size), max_model_len=max_model_len, eos_token_ids={EOS}, **kw
    )


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 8, **params) -> Sequence:
    prompt = [(sum(map(ord, request_id)) * 13 + 7 * i) % 900 + 20 for i in range(prompt_len)]
    return Sequence(request_id, prompt, sampling_params=SamplingParams(max_tokens=max_tokens, **params))


def run_step(scheduler: Scheduler, runner: FakeRunner):
    step = scheduler.schedule()
    assert step is not None
    return step, scheduler.update(step, runner.execute(step.step_input))


def test_new_request_joins_while_another_decodes():
    scheduler, runner = make_scheduler(block_size=16), FakeRunner(16)
    a = make_seq("a", 5)
    scheduler.add(a)

    step, touched = run_step(scheduler, runner)
    assert step.sequences == [a] and touched == [a]
    assert step.step_input.positions == [0, 1, 2, 3, 4]
    assert step.step_input.input_ids == a.prompt_token_ids
    assert step.step_input.slot_mapping == [0, 1, 2, 3, 4]
    assert a.num_computed_tokens == 5 and a.num_output_tokens == 1

    run_step(scheduler, runner)  # a decodes position 5
    b = make_seq("b", 3)
    scheduler.add(b)
    step, touched = run_step(scheduler, runner)
    inp = step.step_input
    assert step.sequences == [a, b] and touched == [a, b]
    assert inp.input_ids == [a.output_token_ids[1]] + b.prompt_token_ids
    assert inp.positions == [6, 0, 1, 2]
    assert inp.slot_mapping == [6, 16, 17, 18]
    sa, sb = inp.sequences
    assert (sa.query_len, sa.seq_len, sa.block_table, sa.output_index) == (1, 7, [0], 2)
    assert (sb.query_len, sb.seq_len, sb.block_table, sb.output_index) == (3, 3, [1], 0)
    assert sa.sampling_params is a.sampling_params and sa.needs_sample and sb.needs_sample
    assert a.output_token_ids == reference(a.prompt_token_ids, 3)
    assert b.output_token_ids == reference(b.prompt_token_ids, 1)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_staggered_requests_match_reference(block_size):
    scheduler, runner = make_scheduler(num_blocks=512 // block_size, block_size=block_size), FakeRunner(block_size)
    arrivals = {0: [("a", 7, 12), ("b", 1, 3)], 2: [("c", 16, 9)], 3: [("d", 17, 1)], 5: [("e", 33, 6)]}
    seqs: dict[str, Sequence] = {}
    for step_no in range(100):
        for rid, prompt_len, max_tokens in arrivals.get(step_no, []):
            seqs[rid] = make_seq(rid, prompt_len, max_tokens)
            scheduler.add(seqs[rid])
        if not scheduler.has_unfinished() and step_no > max(arrivals):
            break
        run_step(scheduler, runner)
    for seq in seqs.values():
        assert seq.output_token_ids == reference(seq.prompt_token_ids, seq.sampling_params.max_tokens)
        assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.finish_reason == "length"
        assert seq.block_table == []
    mixed = [s for s in runner.steps if {q.query_len == 1 for q in s.sequences} == {True, False}]
    assert mixed, "some step should mix prefill and decode"
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_by_recompute_then_completion(prefix_caching):
    # 10 blocks of 4 slots; four requests each growing to 17-22 tokens (5-6 blocks).
    scheduler = Scheduler(BlockManager(10, 4, enable_prefix_caching=prefix_caching), max_model_len=40,
                          eos_token_ids={EOS})
    runner = FakeRunner(4)
    seqs = [make_seq(f"r{i}", n, 15) for i, n in enumerate((7, 2, 5, 4))]
    for seq in seqs:
        scheduler.add(seq)
    preempted_seen = []
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        step, _ = run_step(scheduler, runner)
        for victim in step.preempted:
            assert victim.status is SequenceStatus.WAITING and victim.block_table == []
            assert victim.num_computed_tokens == 0 and victim not in step.sequences
            preempted_seen.append((victim, victim.num_tokens, victim.num_output_tokens))
        if step.preempted:
            # the newest running sequences were sent back, to the front of the queue
            assert max(seqs.index(s) for s in step.sequences) < min(seqs.index(s) for s in step.preempted)
            assert scheduler.waiting[0] in step.preempted
    assert scheduler.num_preemptions > 0 and preempted_seen
    for seq in seqs:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 15)
    assert scheduler.block_manager.num_free_blocks == 10

    # The recompute: a later step prefills the victim's prompt and outputs so far.
    victim, num_tokens, num_outputs = preempted_seen[0]
    # Without prefix caching every token is computed again; with it, the victim's
    # full blocks may still be cached and only the rest is computed.
    recomputes = [s for step in runner.steps for s in step.sequences if s.seq_len == num_tokens and s.needs_sample
                  and s.output_index == num_outputs and s.query_len > 1]
    assert recomputes
    if not prefix_caching:
        assert recomputes[0].query_len == num_tokens


def test_preemption_takes_the_newest_running_sequence():
    scheduler, runner = make_scheduler(num_blocks=4, block_size=4, max_model_len=16), FakeRunner(4)
    a, b, c, d = make_seq("a", 4), make_seq("b", 1), make_seq("c", 1), make_seq("d", 1)
    for seq in (a, b, c, d):
        scheduler.add(seq)
    run_step(scheduler, runner)  # four prefills fill the four blocks
    assert scheduler.block_manager.num_free_blocks == 0
    step, _ = run_step(scheduler, runner)  # a's 5th token needs a block: d gives its own back
    assert step.sequences == [a, b, c] and step.preempted == [d]
    assert list(scheduler.waiting) == [d] and d.output_token_ids == reference(d.prompt_token_ids, 1)
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    for seq in (a, b, c, d):
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 8)


def test_token_budget_and_max_num_seqs():
    scheduler, runner = make_scheduler(max_num_batched_tokens=16, max_num_seqs=2), FakeRunner(16)
    for rid in "abc":
        scheduler.add(make_seq(rid, 10, max_tokens=3))
    step, _ = run_step(scheduler, runner)
    # a whole, and the first 6 tokens of b: one budget, no sample for b yet
    assert [(s.request_id, q.query_len, q.needs_sample) for s, q in zip(step.sequences, step.step_input.sequences)] \
        == [("a", 10, True), ("b", 6, False)]
    step, _ = run_step(scheduler, runner)
    assert [(s.request_id, q.query_len) for s, q in zip(step.sequences, step.step_input.sequences)] \
        == [("a", 1), ("b", 4)]
    assert scheduler.num_waiting == 1  # c waits: max_num_seqs
    step, _ = run_step(scheduler, runner)
    assert [s.request_id for s in step.sequences] == ["a", "b"]
    step, _ = run_step(scheduler, runner)  # a finished last step: c joins
    assert [s.request_id for s in step.sequences] == ["b", "c"]
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    for seq in step.sequences:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 3)


def test_long_prompt_is_chunked_and_decodes_run_every_step():
    scheduler, runner = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4), FakeRunner(16)
    short = [make_seq(f"s{i}", 4, max_tokens=12) for i in range(3)]
    for seq in short:
        scheduler.add(seq)
    run_step(scheduler, runner)
    long = make_seq("long", 40, max_tokens=2)
    scheduler.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        step, _ = run_step(scheduler, runner)
        assert step.num_tokens <= 16
        assert all(s in step.sequences for s in short)  # never starved by the long prompt
        q = step.step_input.sequences[step.sequences.index(long)]
        chunks.append((q.query_len, q.seq_len, q.needs_sample))
    assert chunks == [(13, 13, False), (13, 26, False), (13, 39, False), (1, 40, True)]
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    assert long.output_token_ids == reference(long.prompt_token_ids, 2)
    for seq in short:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 12)


def test_stops_eos_stop_token_ids_max_model_len():
    prompt = [30, 31, 32]
    ref = reference(prompt, 6)
    scheduler = Scheduler(BlockManager(16, 4), max_model_len=7, eos_token_ids={ref[2]})
    runner = FakeRunner(4)
    eos = Sequence("eos", list(prompt), sampling_params=SamplingParams(max_tokens=6))
    ignore = Sequence("ignore", list(prompt), sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))
    stop_id = Sequence("stop_id", list(prompt), sampling_params=SamplingParams(max_tokens=6, stop_token_ids=(ref[1],)))
    too_long = Sequence("long", list(prompt), sampling_params=SamplingParams(max_tokens=100, ignore_eos=True))
    for seq in (eos, ignore, stop_id, too_long):
        scheduler.add(seq)
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    assert (eos.output_token_ids, eos.finish_reason) == (ref[:3], "stop")  # EOS is kept as the last token
    assert (ignore.output_token_ids, ignore.finish_reason) == (ref[:3], "length")
    assert (stop_id.output_token_ids, stop_id.finish_reason) == (ref[:2], "stop")
    assert (too_long.output_token_ids, too_long.finish_reason) == (ref[:4], "length")  # 3 + 4 = max_model_len
    assert scheduler.block_manager.num_free_blocks == 16


def test_abort_frees_blocks_and_skips_in_flight_results():
    scheduler, runner = make_scheduler(num_blocks=8, block_size=4, max_model_len=32), FakeRunner(4)
    a, b, c = make_seq("a", 5), make_seq("b", 6), make_seq("c", 30)
    for seq in (a, b, c):
        scheduler.add(seq)
    step = scheduler.schedule()
    assert step.sequences == [a, b]  # c needs 8 blocks, only 4 are left
    assert scheduler.block_manager.num_free_blocks == 4

    assert scheduler.abort("b") is b  # while the step is in flight
    assert b.finish_reason == "abort" and b.block_table == []
    assert scheduler.block_manager.num_free_blocks == 6
    touched = scheduler.update(step, runner.execute(step.step_input))
    assert touched == [a] and b.output_token_ids == []

    assert scheduler.abort("c") is c and c.status is SequenceStatus.FINISHED_ABORTED  # a waiting one
    assert scheduler.num_waiting == 0
    assert scheduler.abort("c") is None and scheduler.abort("nope") is None
    scheduler.abort("a")
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 8
    assert scheduler.schedule() is None


def test_finish_for_a_stop_string():
    scheduler, runner = make_scheduler(), FakeRunner(16)
    a, b = make_seq("a", 4, max_tokens=5), make_seq("b", 4, max_tokens=1)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler, runner)
    assert b.finish_reason == "length"
    # the caller finds a stop string in the text of the tokens just returned
    assert scheduler.finish("a", "stop") is a and a.finish_reason == "stop" and a.block_table == []
    assert scheduler.finish("b", "stop") is b and b.finish_reason == "stop"  # stop strings beat length
    assert not scheduler.has_unfinished()
    with pytest.raises(InvalidArgumentError):
        scheduler.finish("a", "done")


def test_add_and_config_validation():
    scheduler = make_scheduler(max_model_len=8)
    scheduler.add(make_seq("a", 3))
    with pytest.raises(InvalidArgumentError, match="already in flight"):
        scheduler.add(make_seq("a", 3))
    with pytest.raises(InvalidArgumentError):
        scheduler.add(Sequence("empty", []))
    with pytest.raises(InvalidArgumentError, match="no room"):
        scheduler.add(make_seq("big", 8))
    with pytest.raises(InvalidArgumentError, match="KV cache"):
        make_scheduler(num_blocks=2, block_size=4, max_model_len=9)
    with pytest.raises(InvalidArgumentError):
        make_scheduler(max_num_seqs=8, max_num_batched_tokens=4)


def test_sequence_record_roundtrip():
    seq = make_seq("r", 5, temperature=0.5, stop=("\n",), seed=3)
    seq.output_token_ids += [1, 2]
    seq.block_table += [4, 9]
    seq.num_computed_tokens = 6
    seq.status = SequenceStatus.RUNNING
    back = Sequence.from_record(seq.to_record())
    assert back.to_record() == seq.to_record() and back.sampling_params == seq.sampling_params
    assert back.token_ids_from(3) == seq.all_token_ids[3:] and back.token_ids_from(6) == [2]


def test_prefix_cache_hit_skips_the_shared_blocks():
    scheduler, runner = make_scheduler(block_size=4), FakeRunner(4)
    system = [(37 * i) % 900 + 20 for i in range(18)]
    a = Sequence("a", system + [5, 6], sampling_params=SamplingParams(max_tokens=4))
    scheduler.add(a)
    run_step(scheduler, runner)
    b = Sequence("b", system + [7, 8, 9], sampling_params=SamplingParams(max_tokens=4))
    scheduler.add(b)
    step, _ = run_step(scheduler, runner)
    qb = step.step_input.sequences[step.sequences.index(b)]
    assert (qb.query_len, qb.seq_len) == (5, 21)  # 16 tokens (4 full blocks) came from the cache
    assert b.num_cached_tokens == 16 and b.block_table[:4] == a.block_table[:4]
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    assert a.output_token_ids == reference(a.prompt_token_ids, 4)
    assert b.output_token_ids == reference(b.prompt_token_ids, 4)
    bm = scheduler.block_manager
    assert bm.num_hit_tokens == 16 and bm.num_free_blocks == bm.num_blocks

    # The whole prompt cached: its last token is still computed, so there are logits.
    c = Sequence("c", system[:16], sampling_params=SamplingParams(max_tokens=2))
    scheduler.add(c)
    step, _ = run_step(scheduler, runner)
    q = step.step_input.sequences[0]
    assert (q.query_len, q.seq_len, q.needs_sample) == (4, 16, True)
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    assert c.output_token_ids == reference(c.prompt_token_ids, 2)


def test_n_completions_share_the_prompt_blocks():
    scheduler, runner = make_scheduler(block_size=4), FakeRunner(4)
    prompt = list(range(50, 63))  # 3 full blocks + 1 token
    children = [Sequence(f"r#{i}", list(prompt), sampling_params=SamplingParams(max_tokens=3), group_id="r", index=i)
                for i in range(3)]
    for seq in children:
        scheduler.add(seq)
    step, _ = run_step(scheduler, runner)
    assert [q.query_len for q in step.step_input.sequences] == [13, 1, 1]
    shared = children[0].block_table[:3]
    assert all(c.block_table[:3] == shared for c in children)
    assert [scheduler.block_manager.ref_counts[b] for b in shared] == [3, 3, 3]
    assert len({c.block_table[3] for c in children}) == 3  # each writes its own tail
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    assert all(c.output_token_ids == reference(prompt, 3) for c in children)


def test_priority_orders_admission_and_preemption():
    scheduler, runner = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, max_num_seqs=3), FakeRunner(4)
    low_old = make_seq("low-old", 4)
    low_old.priority = 5
    scheduler.add(low_old)
    run_step(scheduler, runner)
    mid, high, late_high = make_seq("mid", 3), make_seq("high", 3), make_seq("late-high", 3)
    mid.priority, high.priority, late_high.priority = 1, -1, -1
    for seq in (mid, high, late_high):
        scheduler.add(seq)
    assert [s.request_id for s in scheduler.waiting] == ["high", "late-high", "mid"]
    step, _ = run_step(scheduler, runner)
    assert [s.request_id for s in step.sequences] == ["low-old", "high", "late-high"]
    # When high's 5th token needs a block and none is free, the lowest priority
    # goes, although it is the oldest.
    while not step.preempted:
        step, _ = run_step(scheduler, runner)
    assert step.preempted == [low_old] and low_old.status is SequenceStatus.WAITING
    assert high.num_output_tokens == 3 and high in step.sequences  # its 5th token got the block
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    for seq in (low_old, mid, high, late_high):
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 8)


def test_waiting_queue_limit_refuses_at_once():
    scheduler = make_scheduler(max_num_waiting=2)
    scheduler.add(make_seq("a", 3))
    scheduler.add(make_seq("b", 3))
    with pytest.raises(ResourceExhaustedError, match="waiting queue is full"):
        scheduler.add(make_seq("c", 3))
    scheduler.add(make_seq("recovered", 3), force=True)  # recovery after a restart is never refused
    assert scheduler.num_waiting == 3 and scheduler.get("c") is None
    scheduler.schedule()  # admitted: room again
    scheduler.add(make_seq("c", 3))


def test_runner_gets_token_history_once_and_is_told_to_forget():
    scheduler, runner = make_scheduler(num_blocks=4, block_size=4, max_model_len=16), FakeRunner(4)
    penalised = make_seq("p", 6, max_tokens=6, repetition_penalty=1.3)
    plain = make_seq("q", 6, max_tokens=2)
    scheduler.add(plain)
    run_step(scheduler, runner)
    scheduler.add(penalised)
    step, _ = run_step(scheduler, runner)
    qp = step.step_input.sequences[step.sequences.index(penalised)]
    qq = step.step_input.sequences[step.sequences.index(plain)]
    assert qp.seq_id == "p" and qp.context_token_ids == [] and qq.seq_id == "" and qq.context_token_ids is None
    step, _ = run_step(scheduler, runner)
    assert step.step_input.sequences[0].context_token_ids is None  # the runner has it now
    scheduler.reset()  # the runner restarted: recompute, resend the history
    step, _ = run_step(scheduler, runner)
    q = step.step_input.sequences[0]
    assert q.seq_id == "p" and q.context_token_ids == [] and q.query_len == q.seq_len == penalised.num_tokens - 1
    assert step.step_input.finished_seq_ids == []  # the reset runner has nothing to forget
    scheduler.abort("p")
    scheduler.add(make_seq("z", 2))
    step = scheduler.schedule()
    assert step.step_input.finished_seq_ids == ["p"]


def test_min_tokens_defers_eos_and_stop_token_ids():
    prompt = [30, 31, 32]
    ref = reference(prompt, 6)
    scheduler, runner = Scheduler(BlockManager(16, 4), max_model_len=64, eos_token_ids={ref[0]}), FakeRunner(4)
    seq = Sequence("m", list(prompt), sampling_params=SamplingParams(max_tokens=6, min_tokens=2,
                                                                        stop_token_ids=(ref[1], ref[3])))
    scheduler.add(seq)
    while scheduler.has_unfinished():
        run_step(scheduler, runner)
    assert seq.output_token_ids == ref[:4] and seq.finish_reason == "stop"


def test_random_workload_matches_reference_and_keeps_block_invariants():
    import random

    rng = random.Random(7)
    bm = BlockManager(24, 4)
    scheduler, runner = Scheduler(bm, max_model_len=64, max_num_seqs=6, max_num_batched_tokens=24,
                                  eos_token_ids={EOS}), FakeRunner(4)
    shared = [rng.randrange(20, 900) for _ in range(12)]
    seqs = []
    for step_no in range(400):
        if step_no < 60 and rng.random() < 0.4:
            prefix = shared[: rng.choice([0, 4, 8, 12])]
            prompt = prefix + [rng.randrange(20, 900) for _ in range(rng.randrange(1, 20))]
            seq = Sequence(f"r{len(seqs)}", prompt, sampling_params=SamplingParams(max_tokens=rng.randrange(1, 20)),
                           priority=rng.choice([0, 0, 1, -1]))
            seqs.append(seq)
            scheduler.add(seq)
        if not scheduler.has_unfinished():
            continue
        run_step(scheduler, runner)
        live = scheduler.running
        for block_id in range(bm.num_blocks):
            assert bm.ref_counts[block_id] == sum(s.block_table.count(block_id) for s in live)
        assert bm.num_free_blocks == sum(1 for r in bm.ref_counts if r == 0)
    assert not scheduler.has_unfinished()
    for seq in seqs:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, seq.sampling_params.max_tokens), seq
    assert scheduler.num_preemptions > 0 and bm.num_hit_tokens > 0


def test_scheduler_imports_no_torch_or_grpc():
    code = (
        "import sys, llmexec.scheduler.scheduler, llmexec.scheduler.block_manager, llmexec.scheduler.detokenizer;"
        "bad = [m for m in ('torch', 'grpc', 'google.protobuf') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
