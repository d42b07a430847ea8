"""A slow reader's queued chunks go out merged (server.next_items), order and finish kept."""

from __future__ import annotations

import asyncio

import pytest

from llmexec.errors import UnavailableError
from llmexec.scheduler.request_state import END, StreamChunk
from llmexec.scheduler.server import next_items


def collect(items) -> list[StreamChunk]:
    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        return [chunk async for chunk in next_items(queue)]

    return asyncio.run(run())


def test_queued_chunks_of_one_completion_merge_and_shared_chunks_stay_untouched():
    chunks = [StreamChunk(index=0, token_ids=[i], text=f"t{i}") for i in range(3)]
    last = StreamChunk(index=0, token_ids=[3], text="t3", finish_reason="length", completion_tokens=4)
    out = collect([*chunks, last, END])
    assert len(out) == 1
    assert out[0].token_ids == [0, 1, 2, 3] and out[0].text == "t0t1t2t3"
    assert out[0].finish_reason == "length" and out[0].completion_tokens == 4
    assert [c.token_ids for c in chunks] == [[0], [1], [2]]  # other subscribers hold the same objects


def test_interleaved_completions_keep_their_order():
    items = [StreamChunk(index=0, token_ids=[1]), StreamChunk(index=1, token_ids=[2]),
             StreamChunk(index=1, token_ids=[3]), StreamChunk(index=0, token_ids=[4]), END]
    assert [(c.index, c.token_ids) for c in collect(items)] == [(0, [1]), (1, [2, 3]), (0, [4])]


def test_an_error_after_chunks_is_raised_after_they_are_delivered():
    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for item in (StreamChunk(index=0, token_ids=[1]), UnavailableError("runner failed")):
            queue.put_nowait(item)
        got = []
        with pytest.raises(UnavailableError):
            async for chunk in next_items(queue):
                got.append(chunk.token_ids)
        return got

    assert asyncio.run(run()) == [[1]]
