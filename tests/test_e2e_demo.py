"""The real SmolLM2 demo model through loader, runner and scheduler equals transformers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 32


def hf_greedy(model, input_ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([input_ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(input_ids):].tolist()


def stream_generate(address: str, request: scheduler_pb2.GenerateRequest) -> list[scheduler_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        return list(scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, timeout=600))


def chat_request(prompt: str) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        messages=[scheduler_pb2.ChatMessage(role="user", content=prompt)],
        sampling_params=sampling_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0),
    )


def test_concurrent_chat_completions_equal_transformers(demo_stack, hf_demo):
    model, tokenizer = hf_demo
    # Send every request at once: the scheduler must batch prefills with
    # running decodes for these to overlap.
    with ThreadPoolExecutor(len(CHAT_PROMPTS)) as pool:
        streams = list(pool.map(lambda p: stream_generate(demo_stack.scheduler, chat_request(p)), CHAT_PROMPTS))
    for prompt, stream in zip(CHAT_PROMPTS, streams):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = hf_greedy(model, input_ids, NEW_TOKENS)
        got = [t for reply in stream for t in reply.token_ids]
        assert got == expected, f"{prompt!r}: {tokenizer.decode(got)!r} != {tokenizer.decode(expected)!r}"
        assert stream[0].request_id
        assert stream[-1].finish_reason in (scheduler_pb2.FINISH_REASON_LENGTH, scheduler_pb2.FINISH_REASON_STOP)
        assert stream[-1].completion_tokens == len(got)
        assert stream[-1].prompt_tokens == len(input_ids)
        assert "".join(r.text for r in stream) == tokenizer.decode(got, skip_special_tokens=True)


def test_france_answer_and_plain_prompt_tokenized_like_hf(demo_stack, hf_demo):
    model, tokenizer = hf_demo
    stream = stream_generate(demo_stack.scheduler, chat_request("What is the capital of France?"))
    assert "Paris" in "".join(r.text for r in stream)
    prompt = "The three laws of robotics are"
    request = scheduler_pb2.GenerateRequest(
        prompt=prompt, sampling_params=sampling_pb2.SamplingParams(max_tokens=12, temperature=0)
    )
    got = [t for r in stream_generate(demo_stack.scheduler, request) for t in r.token_ids]
    assert got == hf_greedy(model, tokenizer(prompt)["input_ids"], 12)


def test_stop_string_ends_the_stream_without_the_stop_text(demo_stack, hf_demo):
    model, tokenizer = hf_demo
    request = chat_request("What is the capital of France?")
    request.sampling_params.stop.append("France is")
    stream = stream_generate(demo_stack.scheduler, request)
    text = "".join(r.text for r in stream)
    assert stream[-1].finish_reason == scheduler_pb2.FINISH_REASON_STOP
    assert text == "The capital of "


def test_cli_generate_streams_text_n_completions_and_logprobs(demo_stack):
    greedy = demo_stack.cli("generate", "--chat", "What is the capital of France?", "--max-tokens", "16",
                            "--address", demo_stack.scheduler)
    assert greedy.returncode == 0, greedy.stderr
    assert "Paris" in greedy.stdout
    sampled = demo_stack.cli("generate", "--chat", "Name a color.", "--max-tokens", "6", "--temperature", "0.8",
                             "--seed", "3", "-n", "2", "--logprobs", "2", "--repetition-penalty", "1.1",
                             "--address", demo_stack.scheduler)
    assert sampled.returncode == 0, sampled.stderr
    assert "--- completion 0" in sampled.stdout and "--- completion 1" in sampled.stdout
    assert "logprob" in sampled.stderr and "rank" in sampled.stderr
    refused = demo_stack.cli("generate", "hi", "--top-p", "0", "--address", demo_stack.scheduler)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
