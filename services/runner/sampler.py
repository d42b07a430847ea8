"""Turn the last row of logits of each sampled sequence into a token id.

Random rows are drawn by the exponential race: argmax(probs / E) with
E ~ Exp(1) i.i.d. picks token i with probability probs[i]. Its noise is one
tensor per row, so a seeded row fills its own row from its own generator and
gets the same token whatever else is in the batch.
"""

from __future__ import annotations

import hashlib

import torch

from llmexec.errors import InvalidArgumentError
from llmexec.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> list[int]:
    """logits [R, V] float32, one SamplingParams and output index per row -> R token ids.

    temperature == 0 is greedy (argmax); otherwise temperature, then top-k, then top-p.
    A row with a seed draws from a generator seeded by (seed, output_index); others
    use the global RNG.
    """
    if not len(params) == len(output_indices) == logits.shape[0]:
        raise InvalidArgumentError(
            f"sample: {logits.shape[0]} logit rows but {len(params)} params and {len(output_indices)} output indices"
        )
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        tokens[rows] = _sample_random(
            logits[rows], [params[i] for i in random_rows], [output_indices[i] for i in random_rows]
        )
    return tokens.tolist()


def _sample_random(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> torch.Tensor:
    temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    logits = logits / temperatures[:, None]
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


def _mask_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k, then outside its top-p nucleus."""
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab_size, device=logits.device)
    top_k = torch.tensor([k if 0 < k < vocab_size else vocab_size for k in top_ks], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))

    top_p = torch.tensor(top_ps, dtype=logits.dtype, device=logits.device)
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
