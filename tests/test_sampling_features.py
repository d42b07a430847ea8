"""Penalties, min-p, min_tokens, logprobs and the runner's token history.

The repetition penalty and min_tokens are checked against transformers'
generate (its RepetitionPenaltyLogitsProcessor and MinNewTokensLengthLogitsProcessor
follow the same rules as vLLM); presence and frequency penalties, which
transformers lacks, against their formula written out.
"""

from __future__ import annotations

import pytest
import torch
from paged_harness import fused_weights
from tiny_models import tiny_llama

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.runner.model_runner import ModelRunner
from llmexec.runner.sampler import sample, token_logprobs
from llmexec.runner.token_history import TokenHistories
from llmexec.sampling_params import SamplingParams
from llmexec.step import SequenceInput, StepInput

BLOCK = 4


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def runner(model):
    config = model.config.to_dict()
    return ModelRunner(config, fused_weights(config, model.state_dict()), num_blocks=64, block_size=BLOCK)


def generate(runner: ModelRunner, prompt: list[int], params: SamplingParams, steps: int, eos=(), seq_id="s",
             first_block: int = 0) -> list[int]:
    """Prefill then decode one sequence through ModelRunner.execute_step with a TokenHistories."""
    histories = TokenHistories()
    tokens = list(prompt)
    table = list(range(first_block, first_block + 16))
    computed = 0
    out = []
    for i in range(steps):
        start, end = computed, len(tokens)
        step = StepInput(
            input_ids=tokens[start:end], positions=list(range(start, end)),
            slot_mapping=[table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)],
            sequences=[SequenceInput(query_len=end - start, seq_len=end, block_table=table, needs_sample=True,
                                     sampling_params=params, output_index=i,
                                     seq_id=seq_id if params.needs_token_history else "")],
            eos_token_ids=list(eos),
        )
        token = runner.execute_step(step, histories.update(step)).sampled_token_ids[0]
        computed = end
        tokens.append(token)
        out.append(token)
    return out


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_matches_transformers(runner, model):
    prompt = [5, 9, 5, 77, 9, 100]
    plain = hf_greedy(model, prompt, 16)
    penalised = hf_greedy(model, prompt, 16, repetition_penalty=1.8)
    assert penalised != plain  # the penalty matters for this prompt
    assert generate(runner, prompt, SamplingParams(temperature=0), 16) == plain
    assert generate(runner, prompt, SamplingParams(temperature=0, repetition_penalty=1.8), 16) == penalised


def test_min_tokens_matches_transformers(runner, model):
    prompt = [11, 12, 13]
    plain = hf_greedy(model, prompt, 8)
    eos = plain[1]  # greedy would end at its second token
    expected = hf_greedy(model, prompt, 8, min_new_tokens=5, eos_token_id=eos)
    ours = generate(runner, prompt, SamplingParams(temperature=0, min_tokens=5), 8, eos=[eos])
    assert eos not in ours[:5] and ours[:len(expected)] == expected
    # a stop token id is held back the same way
    stop = SamplingParams(temperature=0, min_tokens=5, stop_token_ids=(eos,))
    assert eos not in generate(runner, prompt, stop, 5)
    assert generate(runner, prompt, SamplingParams(temperature=0, min_tokens=5, ignore_eos=True), 3, eos=[eos])[1] == eos


def test_presence_and_frequency_penalties_follow_their_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=gen)
    history = [3, 4, 4, 7, 7, 7]  # prompt [3, 4], outputs [4, 7, 7, 7]
    params = [SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(temperature=0)]
    expected = logits[0].clone()
    for token, count in {4: 1, 7: 3}.items():
        expected[token] -= 0.5 + 0.25 * count
    expected_token = int(expected.argmax())
    out = sample(logits, params, [4, 4], [history, None])
    assert out == [expected_token, int(logits[1].argmax())]
    # with the penalty strong enough, the most likely token loses its place
    logits[0, 7] = logits[0].max() + 0.5
    assert sample(logits[:1], [SamplingParams(temperature=0, frequency_penalty=2.0)], [4], [history]) != [7]
    assert sample(logits[:1], [SamplingParams(temperature=0)], [4]) == [7]


def test_min_p_keeps_only_tokens_near_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    logits = probs.log().repeat(3000, 1)
    tokens = sample(logits, [SamplingParams(min_p=0.5)] * 3000, [0] * 3000)
    assert set(tokens) == {0, 1}  # 0.12 < 0.5 * 0.5
    assert set(sample(logits, [SamplingParams(min_p=0.2)] * 3000, [0] * 3000)) == {0, 1, 2}


def test_logprobs_of_the_sampled_token_and_the_top_n():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=gen)
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0)]
    chosen = [int(logits[0].argsort(descending=True)[2]), 5, int(logits[2].argmax())]
    result = token_logprobs(logits, chosen, params)
    reference = torch.log_softmax(logits, dim=-1)
    assert result[1] is None
    first = result[0]
    assert first.token_id == chosen[0] and first.rank == 3
    assert first.logprob == pytest.approx(reference[0, chosen[0]].item(), abs=1e-6)
    assert first.top_token_ids == reference[0].topk(3).indices.tolist()
    assert first.top_logprobs == pytest.approx(reference[0].topk(3).values.tolist(), abs=1e-6)
    assert result[2].rank == 1 and result[2].top_token_ids == []


def test_seeded_draws_with_every_processor_ignore_the_batch():
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(1, 300, generator=gen)
    params = SamplingParams(temperature=0.9, min_p=0.05, top_k=40, top_p=0.9, seed=11, repetition_penalty=1.2,
                            presence_penalty=0.3, frequency_penalty=0.1, min_tokens=2, stop_token_ids=(1,))
    history = [1, 2, 3, 3, 9]
    alone = [sample(row, [params], [i], [history])[0] for i in range(6)]
    for i in range(6):
        batch = torch.cat([torch.randn(2, 300, generator=gen), row])
        got = sample(batch, [SamplingParams(seed=3), SamplingParams(temperature=0), params], [0, 0, i],
                     [None, None, history])
        assert got[2] == alone[i]


def step_for(seq_id: str, tokens: list[int], start: int, context=None, finished=()) -> StepInput:
    n = len(tokens)
    return StepInput(input_ids=tokens, positions=list(range(start, start + n)), slot_mapping=[0] * n,
                     sequences=[SequenceInput(query_len=n, seq_len=start + n, block_table=[0], needs_sample=True,
                                              seq_id=seq_id, context_token_ids=context)],
                     finished_seq_ids=list(finished))


def test_token_histories_extend_truncate_refuse_and_forget():
    h = TokenHistories(capacity=2)
    assert h.update(step_for("a", [1, 2, 3], 0)) == [[1, 2, 3]]
    assert h.update(step_for("a", [4], 3)) == [[1, 2, 3, 4]]
    assert h.update(step_for("b", [9], 5, context=[5, 6, 7, 8, 8])) == [[5, 6, 7, 8, 8, 9]]
    assert h.update(step_for("a", [3, 4, 5], 2)) == [[1, 2, 3, 4, 5]]  # a recompute from position 2
    with pytest.raises(FailedPreconditionError, match="token history"):
        h.update(step_for("c", [1], 4))  # never seen, no context: the runner cannot penalise it
    with pytest.raises(FailedPreconditionError):
        h.update(step_for("a", [1], 2, context=[1]))  # a context that does not cover the positions
    assert h.update(step_for("a", [6], 5)) == [[1, 2, 3, 4, 5, 6]]  # refused steps changed nothing
    h.update(step_for("c", [1], 0, finished=["b"]))
    assert "b" not in h and len(h) == 2
    h.update(step_for("d", [1], 0))  # capacity 2: the least recently used (a) goes
    assert "a" not in h and "c" in h and "d" in h


def test_sampling_params_validation():
    for bad in (dict(min_p=1.5), dict(repetition_penalty=0), dict(presence_penalty=3), dict(frequency_penalty=-2.5),
                dict(min_tokens=20, max_tokens=10), dict(logprobs=21), dict(n=0), dict(n=65)):
        with pytest.raises(InvalidArgumentError):
            SamplingParams(**bad)
    params = SamplingParams(seed=5, n=3, logprobs=2, min_p=0.1, repetition_penalty=1.1, stop=("x",))
    assert SamplingParams.from_dict(params.to_dict()) == params
    seeds = {params.for_completion(i).seed for i in range(3)}
    assert len(seeds) == 3 and params.for_completion(0).seed == 5
