"""`llmexec generate`: stream one completion from the scheduler to the terminal."""

from __future__ import annotations

import sys

import grpc

from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc


def build_request(prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float, top_k: int,
                  seed: int | None, stop: list[str]) -> scheduler_pb2.GenerateRequest:
    params = sampling_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop
    )
    if seed is not None:
        params.seed = seed
    request = scheduler_pb2.GenerateRequest(sampling_params=params)
    if chat:
        request.messages.append(scheduler_pb2.ChatMessage(role="user", content=prompt))
    else:
        request.prompt = prompt
    return request


def stream(address: str, request: scheduler_pb2.GenerateRequest, out=sys.stdout) -> scheduler_pb2.FinishReason:
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        finish = scheduler_pb2.FINISH_REASON_UNSPECIFIED
        for reply in stub.Generate(request):
            out.write(reply.text)
            out.flush()
            if reply.finish_reason:
                finish = reply.finish_reason
        out.write("\n")
        return finish
