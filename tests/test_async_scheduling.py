"""Async scheduling: the next decode step planned while one runs (Scheduler.schedule_ahead),
and the runner filling its PREVIOUS_TOKEN placeholders from the tokens it sampled last.

The scheduler tests drive it in the engine's order (send, plan ahead, send, then update
each step in turn) against a fake runner whose next token hashes the whole context it
reads from its KV slots, so a wrong token, position or slot anywhere changes the output.
"""

from __future__ import annotations

from collections import deque

import pytest
from paged_harness import NUM_BLOCKS, Sequence, fused_weights, make_step, shuffled_blocks
from test_model_runner import hf_model
from test_scheduler_core import FakeRunner, make_scheduler, make_seq, reference

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.runner.model_runner import ModelRunner
from llmexec.runner.server import RunnerServicer
from llmexec.sampling_params import SamplingParams
from llmexec.scheduler.sequence import SequenceStatus
from llmexec.step import PREVIOUS_TOKEN, StepInput


class ContinuingRunner(FakeRunner):
    """FakeRunner that keeps its last step's samples and fills PREVIOUS_TOKEN from them."""

    def __init__(self, block_size: int):
        super().__init__(block_size)
        self.last_step_id, self.last_sampled = 0, {}

    def execute(self, step: StepInput) -> list[int]:
        if PREVIOUS_TOKEN in step.input_ids:
            assert step.continues_step_id == self.last_step_id
            row = 0
            for seq in step.sequences:
                if step.input_ids[row] == PREVIOUS_TOKEN:
                    assert seq.query_len == 1
                    step.input_ids[row] = self.last_sampled[seq.block_table_id]
                row += seq.query_len
        sampled = super().execute(step)
        ids = [s.block_table_id for s in step.sequences if s.needs_sample]
        self.last_step_id, self.last_sampled = step.step_id, dict(zip(ids, sampled))
        return sampled


def drive(scheduler, runner, arrivals: dict[int, list], max_loops: int = 400) -> int:
    """The engine's loop, synchronously; returns how many steps were planned ahead."""
    in_flight: deque = deque()
    num_ahead = 0
    for loop in range(max_loops):
        for seq in arrivals.get(loop, []):
            scheduler.add(seq)
        if not in_flight:
            if not scheduler.has_unfinished():
                if loop > max(arrivals, default=0):
                    return num_ahead
                continue
            step = scheduler.schedule()
            in_flight.append((step, runner.execute(step.step_input)))
        if len(in_flight) == 1:
            ahead = scheduler.schedule_ahead(in_flight[0][0])
            if ahead is not None:
                num_ahead += 1
                in_flight.append((ahead, runner.execute(ahead.step_input)))
        step, output = in_flight.popleft()
        scheduler.update(step, output)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_steps_planned_ahead_give_the_same_tokens(block_size):
    scheduler = make_scheduler(num_blocks=1024 // block_size, block_size=block_size)
    runner = ContinuingRunner(block_size)
    specs = {0: [("a", 7, 12), ("b", 1, 3)], 3: [("c", 16, 9)], 4: [("d", 17, 1)], 9: [("e", 33, 6)]}
    arrivals = {loop: [make_seq(*spec) for spec in group] for loop, group in specs.items()}
    num_ahead = drive(scheduler, runner, arrivals)
    assert num_ahead >= 10
    for seq in (s for group in arrivals.values() for s in group):
        assert seq.output_token_ids == reference(seq.prompt_token_ids, seq.sampling_params.max_tokens)
        assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.block_table == []
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    ids = [s.step_id for s in runner.steps]
    assert ids == sorted(set(ids))


def test_a_stop_token_drops_the_token_planned_ahead():
    scheduler, runner = make_scheduler(), ContinuingRunner(16)
    probe = make_seq("s", 9, max_tokens=20)
    expected = reference(probe.prompt_token_ids, 20)
    seq = make_seq("s", 9, max_tokens=20, stop_token_ids=[expected[5]])
    other = make_seq("o", 4, max_tokens=12)
    assert drive(scheduler, runner, {0: [seq, other]}) > 0
    assert seq.output_token_ids == expected[:6] and seq.finish_reason == "stop"
    assert other.output_token_ids == reference(other.prompt_token_ids, 12)
    # The step after the stop was already planned: it computed a 7th token that nobody sees.
    assert any(s.block_table_id == "s" and s.output_index == 6 for step in runner.steps for s in step.sequences)
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_what_the_planned_step_holds_and_when_there_is_none():
    scheduler, runner = make_scheduler(max_num_seqs=2), ContinuingRunner(16)
    a, b = make_seq("a", 5, max_tokens=4), make_seq("b", 3, max_tokens=1)
    scheduler.add(a)
    scheduler.add(b)
    first = scheduler.schedule()
    output = runner.execute(first.step_input)
    ahead = scheduler.schedule_ahead(first)
    inp = ahead.step_input
    # b's only other token comes from `first`: only a continues.
    assert ahead.sequences == [a] and inp.input_ids == [PREVIOUS_TOKEN] and inp.positions == [5]
    assert inp.sequences[0].output_index == 1 and inp.sequences[0].seq_len == 6
    assert inp.continues_step_id == first.step_input.step_id < inp.step_id
    scheduler.update(first, output)
    scheduler.update(ahead, runner.execute(inp))
    assert a.output_token_ids == reference(a.prompt_token_ids, 2) and b.is_finished

    # A prompt arrives while a step runs and there is room for it: schedule() admits it first.
    step = scheduler.schedule()
    scheduler.add(make_seq("c", 4))
    assert scheduler.schedule_ahead(step) is None
    scheduler.update(step, runner.execute(step.step_input))
    step = scheduler.schedule()
    assert len(step.sequences) == 2 == scheduler.max_num_seqs
    assert scheduler.schedule_ahead(step) is not None  # the waiting queue is empty


def test_penalties_go_ahead_on_the_history_the_runner_holds_and_no_step_without_free_blocks():
    scheduler = make_scheduler()
    scheduler.add(make_seq("p", 5, repetition_penalty=1.2))
    step = scheduler.schedule()
    assert step.step_input.sequences[0].context_token_ids == []  # the runner's history starts here
    ahead = scheduler.schedule_ahead(step).step_input.sequences[0]
    assert ahead.seq_id == "p" and ahead.context_token_ids is None  # it extends what the runner holds

    scheduler = make_scheduler(num_blocks=2, block_size=4, max_model_len=8)
    g, h = make_seq("g", 4, max_tokens=3), make_seq("h", 2, max_tokens=3)
    scheduler.add(g)
    scheduler.add(h)
    step = scheduler.schedule()
    assert scheduler.schedule_ahead(step) is None  # g's position 4 needs a block: none is free
    assert len(g.block_table) == len(h.block_table) == 1


# -- the runner's side


def tiny_runner() -> ModelRunner:
    model = hf_model()
    config = model.config.to_dict()
    return ModelRunner(config, fused_weights(config, model.state_dict()), num_blocks=NUM_BLOCKS, block_size=16)


def servicer_for(runner: ModelRunner) -> RunnerServicer:
    servicer = RunnerServicer()
    servicer.runner = runner
    return servicer


def numbered(step: StepInput, step_id: int, seq_id: str = "s", continues: int = 0) -> StepInput:
    step.step_id, step.continues_step_id = step_id, continues
    for seq in step.sequences:
        seq.block_table_id = seq_id
    return step


def test_runner_fills_the_placeholder_from_its_last_samples():
    prompt = [5, 17, 99, 3, 42, 8, 61]
    params = SamplingParams(max_tokens=8, temperature=0)
    tokens = {}
    for mode in ("sync", "ahead"):
        runner = tiny_runner()
        servicer = servicer_for(runner)
        seq = Sequence(prompt, shuffled_blocks(), 16, params)
        out = []
        for step_id in range(1, 6):
            step = numbered(make_step([seq.chunk()]), step_id, continues=step_id - 1)
            if mode == "ahead" and step_id > 1:
                step.input_ids = [PREVIOUS_TOKEN]
            token = servicer._launch(runner, step).result().sampled_token_ids[0]
            seq.token_ids.append(token)
            out.append(token)
        tokens[mode] = out
    assert tokens["ahead"] == tokens["sync"]
    assert len(set(tokens["sync"])) > 1


def test_runner_refuses_a_placeholder_it_cannot_fill():
    runner = tiny_runner()
    servicer = servicer_for(runner)
    params = SamplingParams(max_tokens=8, temperature=0)
    seq = Sequence([5, 17, 99], shuffled_blocks(), 16, params)
    servicer._launch(runner, numbered(make_step([seq.chunk()]), 1)).result()
    seq.token_ids.append(0)
    chunk = seq.chunk()

    def step(**kw) -> StepInput:
        s = numbered(make_step([chunk]), kw.pop("step_id", 2), kw.pop("seq_id", "s"), kw.pop("continues", 1))
        s.input_ids = [PREVIOUS_TOKEN]
        for key, value in kw.items():
            setattr(s.sequences[0], key, value)
        return s

    with pytest.raises(FailedPreconditionError, match="last step started on this runner is 1"):
        servicer._launch(runner, step(continues=7))
    # That refused step 2 becomes the last step: nothing may continue it, nor step 1 any more.
    with pytest.raises(FailedPreconditionError):
        servicer._launch(runner, step(step_id=3, continues=1))
    servicer._launch(runner, numbered(make_step([Sequence([5, 6], shuffled_blocks(1), 16, params).chunk()]), 4,
                                      seq_id="other")).result()
    with pytest.raises(FailedPreconditionError, match="sampled no token for it"):
        servicer._launch(runner, step(step_id=5, continues=4))
    servicer._launch(runner, numbered(make_step([Sequence([5, 6], shuffled_blocks(1), 16, params).chunk()]), 6,
                                      seq_id="s")).result()
    prompt = Sequence([5, 6, 7], shuffled_blocks(2), 16, params)
    servicer._launch(runner, numbered(make_step([prompt.chunk()]), 8, seq_id="p")).result()
    prompt.token_ids += [9, 9]
    two = numbered(make_step([prompt.chunk()]), 9, seq_id="p", continues=8)
    two.input_ids = [PREVIOUS_TOKEN, 4]  # a placeholder that is not the sequence's only query token
    with pytest.raises(InvalidArgumentError, match="one query token"):
        servicer._launch(runner, two)



def test_a_step_waiting_for_the_one_it_continues_gives_up_when_the_runner_detaches():
    import asyncio
    import time

    async def run():
        servicer = servicer_for(tiny_runner())
        started = time.perf_counter()
        waiting = asyncio.ensure_future(servicer._wait_for_step(5))  # step 5 never arrives
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await servicer.detach()
        await asyncio.wait_for(waiting, 2)
        return time.perf_counter() - started

    assert asyncio.run(run()) < 2  # not the 10 s the wait allows


@pytest.mark.parametrize("fill_first", [True, False])
def test_penalties_see_the_token_the_host_has_not_seen_yet(fill_first):
    """A repetition penalty needs each step's tokens in the history. With async scheduling the
    history holds a placeholder for the previous step's token: the sampler reads the device value,
    and fill() writes it in when that step's result reaches the host, before or after the next
    step is queued. Both orders give the tokens of plain, synchronous steps."""
    prompt = [1, 2, 3, 1, 2, 3, 1, 2, 3]  # unpenalized, greedy repeats one token from its third on
    params = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.8)
    tokens = {}
    for mode in ("sync", "ahead"):
        runner = tiny_runner()
        servicer = servicer_for(runner)
        seq = Sequence(prompt, shuffled_blocks(), 16, params)
        out, unfilled = [], None
        for step_id in range(1, 8):
            step = numbered(make_step([seq.chunk()]), step_id, continues=step_id - 1)
            step.sequences[0].seq_id = "s"
            if step_id == 1:
                step.sequences[0].context_token_ids = []
            elif mode == "ahead":
                step.input_ids = [PREVIOUS_TOKEN]
            launched = servicer._launch(runner, step)
            if unfilled is not None:  # the previous step's result reaches the host only now
                servicer.token_histories.fill(*unfilled)
                unfilled = None
            token = launched.result().sampled_token_ids[0]
            if mode == "sync" or fill_first:
                servicer.token_histories.fill(step, [token])
            else:
                unfilled = (step, [token])
            seq.token_ids.append(token)
            out.append(token)
        tokens[mode] = out
        history = servicer.token_histories._tokens["s"]
        assert history[:len(prompt) + 6] == (prompt + out)[:len(prompt) + 6]  # every placeholder filled in
    assert tokens["ahead"] == tokens["sync"]
    assert all(a != b for a, b in zip(tokens["sync"], tokens["sync"][1:]))  # the penalty at work
