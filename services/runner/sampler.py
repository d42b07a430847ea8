"""Turn the last row of logits of each sampled sequence into a token id.

Order, as vLLM's sampler: penalties and min_tokens on the raw logits; greedy
rows take the argmax; random rows are divided by their temperature, then
min-p, top-k and top-p cut the distribution, then a token is drawn.

Random rows are drawn by the exponential race: argmax(probs / E) with
E ~ Exp(1) i.i.d. picks token i with probability probs[i]. Its noise is one
tensor per row, so a seeded row fills its own row from its own generator and
gets the same token whatever else is in the batch.

Logprobs are those of the model's raw distribution (log_softmax of the logits
before any processing), as vLLM returns by default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from llmexec.errors import InvalidArgumentError
from llmexec.host_to_device import to_device
from llmexec.runner.logits_processing import apply_penalties, mask_min_tokens
from llmexec.sampling_params import SamplingParams
from llmexec.step import TokenLogprobs


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_indices: list[int],
    histories: Sequence[list[int] | None] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> list[int]:
    """sample_on_device's tokens as a list (waits for the device)."""
    return sample_on_device(logits, params, output_indices, histories, eos_token_ids).tolist()


def sample_on_device(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_indices: list[int],
    histories: Sequence[list[int] | None] | None = None,
    eos_token_ids: Sequence[int] = (),
    history_tails: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """logits [R, V] float32, one SamplingParams and output index per row -> R token ids (int64,
    on logits' device; on CUDA queued, not waited for).

    histories[r] is row r's token history when its params have penalties (see
    logits_processing.apply_penalties). A row with a seed draws from a generator
    seeded by (seed, output_index); others use the global RNG. `logits` is not changed.
    """
    if not len(params) == len(output_indices) == logits.shape[0]:
        raise InvalidArgumentError(
            f"sample: {logits.shape[0]} logit rows but {len(params)} params and {len(output_indices)} output indices"
        )
    if any(p.needs_token_history or p.min_tokens for p in params):
        logits = logits.clone()
        if histories is not None:
            apply_penalties(logits, params, output_indices, histories, history_tails)
        mask_min_tokens(logits, params, output_indices, eos_token_ids)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = to_device(random_rows, logits.device)
        tokens[rows] = _sample_random(
            logits[rows], [params[i] for i in random_rows], [output_indices[i] for i in random_rows]
        )
    return tokens


def token_logprobs(logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams]) -> list[TokenLogprobs | None]:
    """For each row whose params ask for logprobs: the sampled token's logprob and rank,
    and the top params.logprobs alternatives; None for the other rows."""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not wanted:
        return result
    rows = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = torch.tensor([token_ids[i] for i in wanted], device=logits.device)
    chosen_logprobs = logprobs.gather(1, chosen[:, None])
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1
    num_top = max(params[i].logprobs for i in wanted)
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], chosen[:, None][:, :0])
    for j, i in enumerate(wanted):
        k = params[i].logprobs
        result[i] = TokenLogprobs(
            token_id=token_ids[i],
            logprob=chosen_logprobs[j, 0].item(),
            rank=int(ranks[j]),
            top_token_ids=top_ids[j, :k].tolist(),
            top_logprobs=top_values[j, :k].tolist(),
        )
    return result


def _sample_random(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> torch.Tensor:
    temperatures = to_device([p.temperature for p in params], logits.device, logits.dtype)
    logits = logits / temperatures[:, None]
    if any(p.min_p > 0.0 for p in params):
        logits = _mask_min_p(logits, [p.min_p for p in params])
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _mask_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, (p, output_index) in enumerate(zip(params, output_indices)):
        if p.seed is not None:
            noise[row].exponential_(generator=_generator(p.seed, output_index, probs.device))
    # A zero draw would turn the masked tokens' 0/0 into NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _mask_min_p(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    """Set to -inf every logit whose probability is below min_p x the row's highest."""
    probs = torch.softmax(logits, dim=-1)
    min_p = to_device(min_ps, logits.device, logits.dtype)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _mask_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k, then outside its top-p nucleus."""
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab_size, device=logits.device)
    top_k = to_device([k if 0 < k < vocab_size else vocab_size for k in top_ks], logits.device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))

    top_p = to_device(top_ps, logits.device, logits.dtype)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # Keep a token while the tokens ranked above it hold less than top_p; the first always stays.
    # Rows with top_p == 1 are left alone so rounding in the cumsum cannot trim their tail.
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def _generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    # Hash (seed, output_index) so neighbouring seeds or steps give unrelated streams.
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
