"""Changes to a step's logits before sampling: penalties on seen tokens and min_tokens.

As in vLLM: the repetition penalty divides a positive logit (multiplies a
negative one) of every token seen in the prompt or the output; the frequency
penalty subtracts penalty x (times the token was generated), the presence
penalty subtracts penalty once for any generated token. While a sequence has
generated fewer than min_tokens tokens, EOS (unless ignore_eos) and its
stop_token_ids cannot be drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from llmexec.host_to_device import to_device
from llmexec.sampling_params import SamplingParams
from llmexec.step import PREVIOUS_TOKEN


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_indices: list[int],
    histories: Sequence[list[int] | None],
    history_tails: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """logits [R, V]; histories[r]: every token of row r's sequence so far (prompt then
    outputs; the last output_indices[r] of them are outputs), or None when the row has
    no penalties. A history ending in PREVIOUS_TOKEN (a token the host has not seen)
    takes its value from history_tails[r], a one-element tensor on logits' device.
    Returns the logits, changed in place."""
    vocab_size = logits.shape[1]
    for row, (p, num_outputs, history) in enumerate(zip(params, output_indices, histories)):
        if history is None or not p.needs_token_history:
            continue
        if history[-1] == PREVIOUS_TOKEN and history_tails and row in history_tails:
            tokens = torch.cat([to_device(history[:-1], logits.device), history_tails[row].view(1)])
        else:
            tokens = to_device(history, logits.device)
        num_prompt = len(history) - num_outputs
        output_counts = torch.bincount(tokens[num_prompt:], minlength=vocab_size)[:vocab_size]
        row_logits = logits[row]
        if p.repetition_penalty != 1.0:
            seen = output_counts > 0
            seen[tokens[:num_prompt]] = True
            penalised = torch.where(row_logits > 0, row_logits / p.repetition_penalty,
                                    row_logits * p.repetition_penalty)
            row_logits.copy_(torch.where(seen, penalised, row_logits))
        if p.frequency_penalty:
            row_logits -= p.frequency_penalty * output_counts.to(row_logits.dtype)
        if p.presence_penalty:
            row_logits -= p.presence_penalty * (output_counts > 0).to(row_logits.dtype)
    return logits


def mask_min_tokens(
    logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """Set to -inf the stop tokens of rows still under min_tokens; in place."""
    vocab_size = logits.shape[1]
    for row, (p, num_outputs) in enumerate(zip(params, output_indices)):
        if num_outputs >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        banned = [t for t in banned if 0 <= t < vocab_size]
        if banned:
            logits[row, banned] = float("-inf")
    return logits
