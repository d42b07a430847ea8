"""A steady decode step's ExecuteStepRequest carries O(1) data per sequence: the runner keeps each
sequence's block table (llmexec.runner.block_tables) and the scheduler sends only the blocks appended
since the sequence's previous step. (Completions through the real stack: test_e2e_tiny_llama.)"""

from __future__ import annotations

import pytest

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.rpc.codec import step_from_pb, step_to_pb
from llmexec.runner.block_tables import BlockTables
from llmexec.sampling_params import SamplingParams
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.scheduler import Scheduler
from llmexec.scheduler.sequence import Sequence

BLOCK_SIZE = 4


def run_steps(scheduler: Scheduler, tables: BlockTables, num_steps: int) -> list:
    """Schedule, cross the wire (protobuf bytes), resolve on the runner's side; check every resolved
    table equals the scheduler's. Returns (request bytes, request message) per step."""
    sent = []
    for n in range(num_steps):
        step = scheduler.schedule()
        wire = step_to_pb(step.step_input).SerializeToString()
        pb = type(step_to_pb(step.step_input))()
        pb.ParseFromString(wire)
        received = step_from_pb(pb)
        tables.resolve(received)
        for seq, seq_input in zip(step.sequences, received.sequences):
            assert seq_input.block_table == seq.block_table and seq_input.appended_blocks is None
            assert seq_input.sampling_params == seq.sampling_params  # sent once, kept with the table
        scheduler.update(step, [7 + n] * sum(s.needs_sample for s in step.step_input.sequences))
        sent.append((len(wire), pb))
    return sent


def test_steady_decode_steps_do_not_resend_block_tables():
    scheduler = Scheduler(BlockManager(512, BLOCK_SIZE), max_model_len=1024, max_num_batched_tokens=4096,
                          eos_token_ids=set())
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    short, long = Sequence("short", [5] * 3, sampling_params=params), Sequence("long", [6] * 480, sampling_params=params)
    scheduler.add(short)
    scheduler.add(long)
    sent = run_steps(scheduler, BlockTables(), 12)
    first = sent[0][1].sequences
    assert [len(s.block_table) for s in first] == [1, 120]  # the prefill step sends each table whole
    decode = [pb for _, pb in sent[1:]]
    for pb in decode:
        assert all(len(s.block_table) == 0 and s.block_table_id for s in pb.sequences)
        assert not any(s.HasField("sampling_params") for s in pb.sequences)
        assert all(len(s.appended_blocks) <= 1 for s in pb.sequences)  # one new block at most, at a boundary
    # Blocks appended over the decode steps are exactly what the scheduler added.
    assert [b for pb in decode for b in pb.sequences[0].appended_blocks] == short.block_table[1:]
    # O(1): a 120-block sequence costs the same bytes as a 1-block one, and steps without a new block
    # are the same size whatever the sequences' lengths.
    sizes = [[s.ByteSize() for s in pb.sequences] for pb in decode]
    assert all(abs(a - b) <= 4 for a, b in sizes)  # ids, varint widths and an appended block differ a little
    assert max(max(pair) for pair in sizes) + 100 < first[1].ByteSize()  # its whole table: 120+ bytes more
    no_new_block = [size for size, pb in sent[1:] if not any(s.appended_blocks for s in pb.sequences)]
    assert no_new_block and max(no_new_block) - min(no_new_block) <= 8 and max(no_new_block) < 200


def test_preempted_or_forgotten_sequences_get_their_whole_table_again():
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), max_model_len=256, eos_token_ids=set())
    seq = Sequence("a", [5] * 6, sampling_params=SamplingParams(max_tokens=32, ignore_eos=True))
    scheduler.add(seq)
    tables = BlockTables()
    run_steps(scheduler, tables, 3)
    scheduler.reset()  # the runner lost its KV cache: recompute
    tables_after_restart = BlockTables()
    sent = run_steps(scheduler, tables_after_restart, 3)
    assert list(sent[0][1].sequences[0].block_table) == seq.block_table[: len(sent[0][1].sequences[0].block_table)]
    assert len(sent[0][1].sequences[0].block_table) >= 2 and not sent[1][1].sequences[0].block_table

    # A runner that does not hold the table (restarted without the scheduler knowing) refuses
    # the step and keeps what it had.
    step = scheduler.schedule()
    with pytest.raises(FailedPreconditionError, match="block table of sequence a"):
        BlockTables().resolve(step_from_pb(step_to_pb(step.step_input)))


def test_a_whole_table_needs_its_sampling_params():
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), max_model_len=256, eos_token_ids=set())
    scheduler.add(Sequence("a", [5] * 6, sampling_params=SamplingParams(max_tokens=32, ignore_eos=True)))
    received = step_from_pb(step_to_pb(scheduler.schedule().step_input))
    received.sequences[0].sampling_params = None
    with pytest.raises(InvalidArgumentError, match="sampling_params is required"):
        BlockTables().resolve(received)
