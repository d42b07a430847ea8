"""CUDA graphs of the decode step at a few padded batch sizes.

A decode step of an 8B model is ~450 kernel launches; launched one by one from Python
they take longer than the GPU needs to run them at small batches. Each graph replays
the whole forward pass plus the logits for a fixed batch size in one launch. A step of
B sequences runs the smallest captured size >= B; the padding rows attend to one
key, write no cache slot (slot -1) and their logits are dropped.

Every input lives in one int32 device buffer with a pinned host twin, so a step costs
one host-to-device copy: [input_ids | positions | slot_mapping | seq_lens] (max_batch
each) then the block tables [max_batch, width]. The graphs read views of it. The
attention kernels size their context splits from the graph's max_seq_len (width x
block_size); programs past a sequence's end exit at once, so the graph serves any
shorter context. Steps that do not fit (a prefill, more sequences, a longer context)
run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from llmexec.host_to_device import to_device
from llmexec.models.attention import AttentionMetadata
from llmexec.runner.sampled_tokens import CarriedTokens
from llmexec.step import StepInput

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [size for size in BATCH_SIZES if size < max_batch_size]
    return [*sizes, max_batch_size] if max_batch_size > 0 else []


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_batch_size: int, max_seq_len: int,
                 device: torch.device) -> None:
        """Allocates the input buffers; capture() records the graphs (CUDA only). Until then run()
        executes the same forward eagerly on the same buffers."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_batch = self.sizes[-1]
        self.width = -(-max_seq_len // block_size)
        self.max_seq_len = self.width * block_size
        self.device = device
        batch = self.max_batch
        self.header_len = 4 * batch
        total = self.header_len + batch * self.width
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.buffer = torch.zeros(total, dtype=torch.int32, device=device)
        host = self.host.numpy()
        self.host_ids, self.host_positions, self.host_slots, self.host_seq_lens = (
            host[i * batch : (i + 1) * batch] for i in range(4)
        )
        self.host_tables = host[self.header_len :].reshape(batch, self.width)
        self.host_slots[:] = -1  # padding rows: no cache write, one key to attend to
        self.host_seq_lens[:] = 1
        self.buffer.copy_(self.host)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        # Recorded after each step's copy out of the pinned host buffer: the next step waits on
        # it before writing there (with async scheduling the host runs a step ahead of the GPU).
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def capture(self) -> None:
        """Warm up and capture every size, largest first so smaller ones reuse its memory pool."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        with torch.inference_mode():
            for size in reversed(self.sizes):
                metadata = self._metadata(size)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # compiles the kernels for this shape outside the capture
                    self._forward(size, metadata)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self._forward(size, metadata)
                self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        log.info("captured %d decode CUDA graphs (batch %s, context <= %d) in %.2f s", len(self.graphs),
                 self.sizes, self.max_seq_len, self.capture_seconds)

    def fits(self, step: StepInput) -> bool:
        """A decode-only step within the captured batch and context sizes."""
        seqs = step.sequences
        return len(seqs) <= self.max_batch and all(
            s.query_len == 1 and s.seq_len <= self.max_seq_len and len(s.block_table) <= self.width for s in seqs
        )

    def run(self, step: StepInput, carried: CarriedTokens | None = None) -> torch.Tensor:
        """Launch the step's graph; returns logits [len(step.sequences), vocab] float32 (a view of the
        graph's output, valid until the next run). Returns without waiting for the GPU.
        carried: input rows filled on the device from an earlier step's sampled tokens."""
        num_seqs = len(step.sequences)
        size = next(s for s in self.sizes if s >= num_seqs)
        if self._copied is not None:
            self._copied.synchronize()  # returns at once before the first record
        self.host_ids[:num_seqs] = step.input_ids
        self.host_positions[:num_seqs] = step.positions
        self.host_slots[:num_seqs] = step.slot_mapping
        self.host_seq_lens[:num_seqs] = [s.seq_len for s in step.sequences]
        self.host_ids[num_seqs:size] = 0
        self.host_positions[num_seqs:size] = 0
        self.host_slots[num_seqs:size] = -1
        self.host_seq_lens[num_seqs:size] = 1
        tables = self.host_tables
        for row, seq in enumerate(step.sequences):
            table = seq.block_table
            tables[row, : len(table)] = table
        # Two copies: the header, and only the table rows this size reads.
        header, rows = self.header_len, size * self.width
        self.buffer[:header].copy_(self.host[:header], non_blocking=True)
        self.buffer[header : header + rows].copy_(self.host[header : header + rows], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if carried is not None:  # decode: row i of the inputs is sequence i
            num_carried = len(carried.rows)
            if carried.rows == list(range(num_carried)):
                self.buffer[:num_carried].copy_(carried.values)
            else:
                self.buffer[to_device(carried.rows, self.device)] = carried.values.to(torch.int32)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.logits[size][:num_seqs]
        with torch.inference_mode():  # not captured (a test on the CPU): the same forward, eagerly
            return self._forward(size, self._metadata(size))[:num_seqs]

    def _forward(self, size: int, metadata: AttentionMetadata) -> torch.Tensor:
        batch = self.max_batch
        input_ids = self.buffer[:size]
        positions = self.buffer[batch : batch + size]
        hidden = self.model(input_ids, positions, metadata, self.kv_caches)
        return self.model.compute_logits(hidden)

    def _metadata(self, size: int) -> AttentionMetadata:
        """Decode-only metadata over views of the input buffer (what the Triton decode path reads)."""
        batch = self.max_batch
        slots = self.buffer[2 * batch : 2 * batch + size]
        seq_lens = self.buffer[3 * batch : 3 * batch + size]
        tables = self.buffer[self.header_len :].view(batch, self.width)[:size]
        rows = torch.arange(size, device=self.device)
        return AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.arange(size + 1, device=self.device),
            seq_lens=seq_lens,
            block_tables=tables,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            block_size=self.block_size,
            decode_query_rows=rows,
            decode_seq_lens=seq_lens,
            decode_block_tables=tables,
            decode_key_mask=torch.ones((size, 1, 1, 0), dtype=torch.bool, device=self.device),
            prefill_spans=[],
        )
