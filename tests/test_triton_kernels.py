"""The Triton kernels against their plain-torch references, on fresh random inputs.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1,
set before any kernel is defined) on CPU tensors, at small shapes; with CUDA the same
tests run natively, with longer sequences so the GPU's larger tiles and context splits
are exercised (scripts/gpu/run_kernel_tests.sh). Every output is NaN-poisoned before the
kernel runs and unused cache slots and block-table padding point at NaN, so an unwritten
element or a read outside a sequence fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, i.e. at import below

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'); the kernels need it")

from llmexec.kernels import backend, reference_ops, torch_reference, triton_decode
from llmexec.kernels.rotary_table import rotary_cos_sin_cache
from llmexec.kernels.triton_cache import reshape_and_cache
from llmexec.kernels.triton_decode import DecodeConfig, paged_decode_attention
from llmexec.kernels.triton_norm import fused_add_rms_norm, rms_norm
from llmexec.kernels.triton_prefill import paged_prefill_attention
from llmexec.kernels.triton_rotary import rotary_embedding
from llmexec.models.attention import AttentionMetadata
from llmexec.models.layers import rope_inv_freq
from llmexec.models.positional import alibi_slopes
from llmexec.step import SequenceInput, StepInput

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# The interpreter's tl.dot mishandles bfloat16 operands (triton 3.9), so on CPU attention is
# checked in float32 and float16; on CUDA in the two 16-bit types models are served in.
ATTENTION_DTYPES = [torch.bfloat16, torch.float16] if ON_CUDA else [torch.float32, torch.float16]
# ||out - ref|| / ||ref||: float32 math is exact to rounding; 16-bit rounds P and the output.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}
# (head_dim, block_size, num_heads, num_kv_heads): head sizes 64/80/128, block sizes 16/32, GQA 1/4/8.
HEAD_LAYOUTS = [(64, 16, 4, 4), (80, 32, 8, 2), (128, 16, 8, 1)]
# Sequence lengths, none a multiple of the block sizes; longer on CUDA, where tiles are 64 keys.
DECODE_SEQ_LENS = [1, 37, 1000, 2113, 300] if ON_CUDA else [1, 37, 100, 70]
# (query_len, seq_len): a fresh prompt, a chunk after cached context, a decode row, a short prompt.
PREFILL_SHAPES = (
    [(300, 300), (130, 1100), (1, 500), (77, 77), (2, 41)] if ON_CUDA else [(37, 37), (20, 70), (1, 33), (5, 5)]
)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "NaN/inf in the output: an element was not written, or poison was read"
    error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert error < REL_TOL[dtype], f"relative error {error:.2e} >= {REL_TOL[dtype]:.0e}"


class PagedBatch:
    """Random sequences in a shuffled paged cache whose unused slots are NaN."""

    def __init__(self, shapes, head_dim, block_size, num_heads, num_kv_heads, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in shapes]
        num_blocks = sum(blocks_per_seq) + 3
        order = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled: tables are not contiguous
        poison_block = order.pop()  # pads every table: reading past a sequence's blocks reads NaN
        cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
        self.block_tables = torch.full((len(shapes), max(blocks_per_seq) + 2), poison_block, dtype=torch.int32)
        for i, ((_, seq_len), n) in enumerate(zip(shapes, blocks_per_seq)):
            table = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
            self.block_tables[i, :n] = table
            slots = (table.long()[:, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]
            self.k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
                seq_len, num_kv_heads, head_dim, generator=gen
            ).to(dtype)
            self.v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
                seq_len, num_kv_heads, head_dim, generator=gen
            ).to(dtype)
        query_lens = [query_len for query_len, _ in shapes]
        self.query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int64)
        self.seq_lens = torch.tensor([seq_len for _, seq_len in shapes], dtype=torch.int32)
        self.max_query_len, self.max_seq_len = max(query_lens), int(self.seq_lens.max())
        # A view into a wider projection output, as q is in a fused qkv: rows are not contiguous.
        fused = torch.randn(sum(query_lens), num_heads + 2, head_dim, generator=gen).to(dtype).to(DEVICE)
        self.query = fused[:, 1 : num_heads + 1]
        self.scale = head_dim**-0.5
        for name in ("k_cache", "v_cache", "block_tables", "query_start_loc", "seq_lens"):
            setattr(self, name, getattr(self, name).to(DEVICE))

    def reference(self, **options):
        return reference_ops.paged_attention_varlen(
            self.query, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens, self.block_tables,
            self.scale, **options,
        )  # fmt: skip

    def poisoned_out(self):
        return torch.full(self.query.shape, float("nan"), dtype=self.query.dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,block_size,num_heads,num_kv_heads", HEAD_LAYOUTS)
def test_decode_attention_matches_reference(dtype, head_dim, block_size, num_heads, num_kv_heads):
    batch = PagedBatch([(1, n) for n in DECODE_SEQ_LENS], head_dim, block_size, num_heads, num_kv_heads, dtype, 1)
    expected = batch.reference()
    # The split count the launcher picks; forced split-K merged in the last program (7 splits take
    # two merge steps at GQA 8) or by a second kernel; one split (no merge).
    configs = (
        None,
        DecodeConfig(block_n=32, num_splits=3),
        DecodeConfig(block_n=16, num_splits=7),
        DecodeConfig(block_n=32, num_splits=3, fused_merge=False),
        DecodeConfig(block_n=16, num_splits=1),
    )
    for config in configs:
        out = paged_decode_attention(
            batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.max_seq_len,
            batch.scale, out=batch.poisoned_out(), config=config,
        )  # fmt: skip
        assert_matches(out, expected, dtype)
    # The fused merge leaves its counters at zero for the next launch.
    assert int(triton_decode.split_counters(DEVICE, 1).count_nonzero()) == 0


def test_decode_split_rule_fills_one_wave():
    """The default split count: the most splits whose grid fits one wave of 3 programs per SM."""
    config, sms = DecodeConfig(), 132  # the H200
    # batch 16 x 8 kv heads = 128 programs per split: 3 splits (384 <= 396) of 43 32-key tiles.
    assert triton_decode.choose_num_splits(config, 16, 8, 4096, sms) == (3, 1376)
    # Already past one wave with one split: never split.
    assert triton_decode.choose_num_splits(config, 64, 8, 32768, sms)[0] == 1
    assert triton_decode.choose_num_splits(config, 256, 8, 4096, sms)[0] == 1
    # One sequence: 49 splits fill the wave; a short context stops at min_partition keys a split.
    assert triton_decode.choose_num_splits(config, 1, 8, 32768, sms)[0] == 49
    assert triton_decode.choose_num_splits(config, 1, 8, 512, sms) == (8, 64)
    assert triton_decode.choose_num_splits(config, 1, 8, 193, sms) == (3, 96)
    # Every split holds keys and the partitions cover the context, also for odd lengths.
    for seqs, heads, seq_len in [(3, 2, 1000), (1, 1, 33), (40, 4, 70001)]:
        splits, partition = triton_decode.choose_num_splits(config, seqs, heads, seq_len, sms)
        assert partition % config.block_n == 0 and (splits - 1) * partition < seq_len <= splits * partition


@pytest.mark.parametrize("num_splits,fused_merge", [(1, True), (4, True), (4, False)])
def test_decode_attention_with_alibi_and_sliding_window(num_splits, fused_merge):
    dtype = ATTENTION_DTYPES[0]
    batch = PagedBatch([(1, n) for n in DECODE_SEQ_LENS], 64, 16, 8, 2, dtype, 2)
    options = {"alibi_slopes": alibi_slopes(8).to(DEVICE), "sliding_window": 27}
    out = paged_decode_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.max_seq_len,
        batch.scale, out=batch.poisoned_out(), config=DecodeConfig(block_n=16, num_splits=num_splits, fused_merge=fused_merge),
        **options,
    )  # fmt: skip
    assert_matches(out, batch.reference(**options), dtype)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,block_size,num_heads,num_kv_heads", HEAD_LAYOUTS)
def test_prefill_attention_matches_reference(dtype, head_dim, block_size, num_heads, num_kv_heads):
    batch = PagedBatch(PREFILL_SHAPES, head_dim, block_size, num_heads, num_kv_heads, dtype, 3)
    out = paged_prefill_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
        batch.max_query_len, batch.scale, out=batch.poisoned_out(),
    )  # fmt: skip
    assert_matches(out, batch.reference(), dtype)


@pytest.mark.parametrize("options", ["alibi", "window", "alibi+window"])
def test_prefill_attention_with_alibi_and_sliding_window(options):
    dtype = ATTENTION_DTYPES[0]
    batch = PagedBatch(PREFILL_SHAPES, 80, 16, 6, 2, dtype, 4)  # group 3: not a power of two
    kwargs = {}
    if "alibi" in options:
        kwargs["alibi_slopes"] = alibi_slopes(6).to(DEVICE)
    if "window" in options:
        kwargs["sliding_window"] = 19
    out = paged_prefill_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
        batch.max_query_len, batch.scale, out=batch.poisoned_out(), **kwargs,
    )  # fmt: skip
    assert_matches(out, batch.reference(**kwargs), dtype)


@pytest.mark.parametrize("decode_only", [True, False])
def test_triton_step_attention_matches_torch_reference(decode_only):
    """The CUDA path of backend.paged_attention (prefill kernel + decode kernel over the decode
    rows, or the decode kernel alone) against torch_reference.paged_attention on one step."""
    dtype, block_size, num_heads, num_kv_heads, head_dim = ATTENTION_DTYPES[0], 16, 8, 2, 64
    shapes = [(1, n) for n in DECODE_SEQ_LENS] if decode_only else PREFILL_SHAPES + [(1, 29)]
    batch = PagedBatch(shapes, head_dim, block_size, num_heads, num_kv_heads, dtype, 5)
    sequences = [
        SequenceInput(query_len, seq_len, batch.block_tables[i, : -(-seq_len // block_size)].tolist(), True)
        for i, (query_len, seq_len) in enumerate(shapes)
    ]
    num_tokens = sum(query_len for query_len, _ in shapes)
    step = StepInput([0] * num_tokens, [0] * num_tokens, [-1] * num_tokens, sequences)
    metadata = AttentionMetadata.build(step, block_size, DEVICE, reference_fields=True)  # both paths read it
    # The torch reference multiplies masked-out NaN slots by zero weights: give it a clean cache.
    k_cache, v_cache = batch.k_cache.nan_to_num(0.0), batch.v_cache.nan_to_num(0.0)
    options = {"alibi_slopes": alibi_slopes(num_heads).to(DEVICE), "sliding_window": 23}
    for kwargs in ({}, options):
        expected = torch_reference.paged_attention(
            batch.query.contiguous(), k_cache, v_cache, metadata, batch.scale, **kwargs
        )
        out = backend.triton_paged_attention(batch.query, batch.k_cache, batch.v_cache, metadata, batch.scale, **kwargs)
        assert_matches(out, expected, dtype)


@pytest.mark.parametrize("head_dim,num_kv_heads", [(64, 1), (80, 2), (128, 8)])
def test_reshape_and_cache_matches_reference(head_dim, num_kv_heads):
    gen = torch.Generator().manual_seed(6)
    num_blocks, block_size, num_tokens = 7, 16, 23
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.tensor([0, 5, 22])] = -1  # padding tokens: skipped
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(ATTENTION_DTYPES[0])
    fused = fused.to(DEVICE)
    key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads : 2 * num_kv_heads]  # strided views
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=fused.dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=fused.dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    torch_reference.reshape_and_cache(key.cpu(), value.cpu(), k_expected, v_expected, slots)
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    reshape_and_cache(key, value, k_cache, v_cache, slots.to(DEVICE))
    # Exact, NaN where nothing was written: a skipped token or a stray write would show.
    torch.testing.assert_close(k_cache.cpu(), k_expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache.cpu(), v_expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [80, 576])
def test_rms_norm_and_fused_add_match_reference(dtype, hidden):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, hidden, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(5, hidden, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    eps = 1e-6
    poisoned = torch.full_like(x, float("nan"))
    assert_matches(rms_norm(x, weight, eps, out=poisoned), reference_ops.rms_norm(x, weight, eps), dtype)

    expected, expected_residual = reference_ops.fused_add_rms_norm(x, residual, weight, eps)
    poisoned = torch.full_like(x, float("nan"))
    out, new_residual = fused_add_rms_norm(x, residual, weight, eps, out=poisoned)
    assert new_residual is residual  # updated in place
    # Exact where the cast to bfloat16 rounds to nearest as in torch; the interpreter truncates.
    exact = {"rtol": 0, "atol": 0} if ON_CUDA or dtype == torch.float32 else {}
    torch.testing.assert_close(residual, expected_residual, **exact)
    assert_matches(out, expected, dtype)


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 80), (128, 128), (80, 20)])
def test_rotary_embedding_in_place_matches_reference(head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(8)
    num_tokens, num_heads, num_kv_heads = 7, 8, 2
    cache = rotary_cos_sin_cache(rope_inv_freq(rotary_dim, 10000.0, None, 4096), 4096, DEVICE)
    positions = torch.randint(1, 4096, (num_tokens,), generator=gen).to(DEVICE)  # 0 would not rotate
    fused = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    fused = fused.to(DEVICE)
    query, key = fused[:, :num_heads], fused[:, num_heads : num_heads + num_kv_heads]  # views of fused qkv
    value_before = fused[:, num_heads + num_kv_heads :].clone()
    expected_query, expected_key = reference_ops.rotary_embedding(positions, query, key, cache)
    rotary_embedding(positions, query, key, cache)
    torch.testing.assert_close(query, expected_query)
    torch.testing.assert_close(key, expected_key)
    torch.testing.assert_close(fused[:, num_heads + num_kv_heads :], value_before, rtol=0, atol=0)
