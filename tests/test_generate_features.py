"""Generate's sampling features and ResumeGenerate, as a client of the demo stack sees them.

transformers, on the same GGUF, is the oracle for the repetition penalty and
for logprobs.
"""

from __future__ import annotations

import threading

import grpc
import torch

from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

CHAT = [scheduler_pb2.ChatMessage(role="user", content="Write a short poem about the moon and the sea.")]


def call(address: str, **kw) -> list[scheduler_pb2.GenerateResponse]:
    params = kw.pop("params", {})
    request = scheduler_pb2.GenerateRequest(sampling_params=sampling_pb2.SamplingParams(**params), **kw)
    with grpc.insecure_channel(address) as channel:
        return list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, timeout=300))


def by_index(replies) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in replies:
        out.setdefault(r.index, []).extend(r.token_ids)
    return out


def test_n_seeded_completions_differ_are_reproducible_and_share_the_prompt(demo_stack):
    params = dict(max_tokens=8, temperature=1.0, seed=42, n=3)
    first = call(demo_stack.scheduler, messages=CHAT, params=params)
    again = call(demo_stack.scheduler, messages=CHAT, params=params)
    completions = by_index(first)
    assert sorted(completions) == [0, 1, 2]
    assert by_index(again) == completions  # same seed, same texts
    assert len({tuple(c) for c in completions.values()}) > 1  # but each completion its own draw
    finals = [r for r in first if r.finish_reason]
    assert sorted(r.index for r in finals) == [0, 1, 2]
    assert max(r.cached_prompt_tokens for r in finals) >= 16  # siblings found the prompt's blocks


def test_repetition_penalty_and_logprobs_match_transformers(demo_stack, hf_demo):
    model, tokenizer = hf_demo
    prompt = "The cat sat on the mat. The cat sat on the"
    params = dict(max_tokens=12, temperature=0, repetition_penalty=1.5, logprobs=2)
    replies = call(demo_stack.scheduler, prompt=prompt, params=params)
    tokens = [t for r in replies for t in r.token_ids]
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        expected = model.generate(**ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
        raw = torch.log_softmax(model(**ids).logits[0, -1].float(), dim=-1)
    assert tokens == expected[0, ids["input_ids"].shape[1]:].tolist()[: len(tokens)]
    logprobs = [lp for r in replies for lp in r.logprobs]
    assert len(logprobs) == len(tokens) and [lp.token_id for lp in logprobs] == tokens
    first = logprobs[0]
    assert abs(first.logprob - raw[tokens[0]].item()) < 1e-3  # the raw distribution, before the penalty
    assert list(first.top_token_ids) == raw.topk(2).indices.tolist()
    assert first.rank == int((raw > raw[tokens[0]]).sum()) + 1


def test_stop_strings_wait_for_min_tokens(demo_stack):
    prompt = "Count with me: 1, 2, 3,"
    early = call(demo_stack.scheduler, prompt=prompt, params=dict(max_tokens=30, temperature=0, stop=[","]))
    late = call(demo_stack.scheduler, prompt=prompt,
                params=dict(max_tokens=30, temperature=0, stop=[","], min_tokens=6))
    early_text, late_text = ("".join(r.text for r in replies) for replies in (early, late))
    assert early[-1].finish_reason == late[-1].finish_reason == scheduler_pb2.FINISH_REASON_STOP
    assert "," not in early_text and early[-1].completion_tokens < 6
    # Under min_tokens the commas do not stop it; the first one after does, and is cut.
    assert late[-1].completion_tokens > 6 and late_text.startswith(early_text + ",")
    assert not late_text.endswith(",") and late_text.count(",") >= 2


def test_resume_while_running_and_after_finishing_gives_the_same_stream(demo_stack):
    request_id = "resume-text-check"
    original: list[scheduler_pb2.GenerateResponse] = []
    first_token = threading.Event()

    def stream():
        request = scheduler_pb2.GenerateRequest(messages=CHAT, request_id=request_id, priority=-1,
                                                sampling_params=sampling_pb2.SamplingParams(max_tokens=24,
                                                                                            temperature=0))
        with grpc.insecure_channel(demo_stack.scheduler) as channel:
            for reply in scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, timeout=300):
                original.append(reply)
                first_token.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_token.wait(timeout=120)
    with grpc.insecure_channel(demo_stack.scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        live = list(stub.ResumeGenerate(scheduler_pb2.ResumeGenerateRequest(request_id=request_id, offset=0)))
        thread.join(timeout=300)
        finished = list(stub.ResumeGenerate(scheduler_pb2.ResumeGenerateRequest(request_id=request_id, offset=5)))
    tokens = [t for r in original for t in r.token_ids]
    text = "".join(r.text for r in original)
    assert [t for r in live for t in r.token_ids] == tokens and "".join(r.text for r in live) == text
    assert [t for r in finished for t in r.token_ids] == tokens[5:]
    assert "".join(r.text for r in finished) == "".join(r.text for r in original[5:])
    assert finished[-1].finish_reason == original[-1].finish_reason != 0
    assert all(r.request_id == request_id for r in live + finished)


def test_stream_interval_groups_tokens_and_keeps_the_stream(demo_stack):
    prompt = "List the planets of the solar system:"
    each = call(demo_stack.scheduler, prompt=prompt, params=dict(max_tokens=10, temperature=0, ignore_eos=True))
    grouped = call(demo_stack.scheduler, prompt=prompt, stream_interval=4,
                   params=dict(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0))
    whole = call(demo_stack.scheduler, prompt=prompt, stream_interval=10,
                 params=dict(max_tokens=10, temperature=0, ignore_eos=True))
    assert [len(r.token_ids) for r in grouped] == [4, 4, 2]
    assert len(whole) == 1 and whole[0].finish_reason == scheduler_pb2.FINISH_REASON_LENGTH
    for replies in (grouped, whole):
        assert [t for r in replies for t in r.token_ids] == [t for r in each for t in r.token_ids]
        assert "".join(r.text for r in replies) == "".join(r.text for r in each)
        assert replies[-1].completion_tokens == 10 and replies[0].request_id
    assert [len(r.logprobs) for r in grouped] == [4, 4, 2]


def test_negative_stream_interval_is_invalid(demo_stack):
    try:
        call(demo_stack.scheduler, prompt="hi", stream_interval=-1, params=dict(max_tokens=2))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream_interval" in exc.details()
    else:
        raise AssertionError("a negative stream_interval was accepted")
