"""`llmexec generate`: stream one completion (or n of them) from the scheduler to the terminal."""

from __future__ import annotations

import argparse
import sys

from llmexec.rpc.auth import bearer_metadata, read_token
from llmexec.rpc.client import sync_channel
from llmexec.rpc.tls import ClientTLS
from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

# argparse dest -> SamplingParams field, for the optional knobs sent only when given.
OPTIONAL_SAMPLING = ("top_k", "seed", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     "min_tokens", "logprobs", "n")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from the running stack")
    p.add_argument("prompt")
    p.add_argument("--address", default="", help="scheduler address (default: the running stack's)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--logprobs", type=int, default=None, help="print each token's logprob and this many alternatives")
    p.add_argument("-n", "--n", type=int, default=None, help="completions of the prompt (printed one after another)")
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stream-interval", type=int, default=0, help="tokens per message (0: each token as it comes)")
    p.add_argument("--api-token-file", default="", help="file holding the scheduler's bearer token")
    p.add_argument("--tls-ca", default="", help="CA certificate: connect with TLS")
    p.add_argument("--tls-cert", default="", help="client certificate, for mutual TLS")
    p.add_argument("--tls-key", default="", help="client key, for mutual TLS")
    p.add_argument("--tls-server-name", default="", help="name to check on the server certificate")


def build_request(args: argparse.Namespace) -> scheduler_pb2.GenerateRequest:
    params = sampling_pb2.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    for name in OPTIONAL_SAMPLING:
        value = getattr(args, name)
        if value is not None:
            setattr(params, name, value)
    request = scheduler_pb2.GenerateRequest(sampling_params=params, stream_interval=args.stream_interval)
    if args.chat:
        request.messages.append(scheduler_pb2.ChatMessage(role="user", content=args.prompt))
    else:
        request.prompt = args.prompt
    return request


def stream(address: str, request: scheduler_pb2.GenerateRequest, args: argparse.Namespace, out=sys.stdout) -> None:
    """Print the text as it streams; with n > 1, each completion's text once it has finished."""
    tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if args.tls_ca else None
    token = read_token(args.api_token_file)
    metadata = bearer_metadata(token) if token else None
    texts: dict[int, list[str]] = {}
    several = request.sampling_params.n > 1
    with sync_channel(address, tls) as channel:
        for reply in scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request, metadata=metadata):
            if several:
                texts.setdefault(reply.index, []).append(reply.text)
            else:
                out.write(reply.text)
            for lp in reply.logprobs:
                alternatives = ", ".join(f"{t}:{v:.3f}" for t, v in zip(lp.top_token_ids, lp.top_logprobs))
                print(f"[token {lp.token_id} logprob {lp.logprob:.3f} rank {lp.rank}; top {alternatives}]",
                      file=sys.stderr)
            out.flush()
    if several:
        for index in sorted(texts):
            out.write(f"--- completion {index}\n{''.join(texts[index])}\n")
    else:
        out.write("\n")
