"""`llmexec trace "prompt"`: trace one prefill and one decode step on the running runner."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from llmexec.cli import stack
from llmexec.cli.trace_render import table, write_all
from llmexec.errors import InvalidArgumentError
from llmexec.rpc.server import CHANNEL_OPTIONS
from llmexec.v1 import loader_pb2, loader_pb2_grpc, runner_pb2, runner_pb2_grpc


def add_trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="trace every module of one prefill and one decode step")
    p.add_argument("prompt", nargs="?", default="", help="text, tokenized with the model's tokenizer")
    p.add_argument("--prompt-token-ids", default="", help="comma-separated token ids instead of text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--runner", default="", help="runner address (default: the running stack's)")
    p.add_argument("--loader", default="", help="loader address, for the tokenizer (default: the running stack's)")
    p.add_argument("--out", default="trace", help="folder for trace.json, trace.mmd, trace.dot (and trace.png)")


def _address(given: str, name: str, default: str) -> str:
    if given:
        return given
    record = stack.load_state().get(name)
    return record.address if record else default


def prompt_ids(args: argparse.Namespace, loader_address: str) -> list[int]:
    if args.prompt_token_ids:
        return [int(t) for t in args.prompt_token_ids.split(",") if t.strip()]
    if not args.prompt:
        raise InvalidArgumentError("give a prompt or --prompt-token-ids")
    from llmexec.scheduler.tokenizer import Tokenizer

    with grpc.insecure_channel(loader_address, options=CHANNEL_OPTIONS) as channel:
        files = loader_pb2_grpc.LoaderServiceStub(channel).GetTokenizer(loader_pb2.GetTokenizerRequest()).files
    if not files:
        raise InvalidArgumentError("the model has no tokenizer; use --prompt-token-ids")
    tokenizer = Tokenizer(dict(files))
    if args.chat:
        return tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    return tokenizer.encode(args.prompt)


def cmd_trace(args: argparse.Namespace) -> int:
    runner_address = _address(args.runner, "runner", "127.0.0.1:50053")
    ids = prompt_ids(args, _address(args.loader, "loader", "127.0.0.1:50052"))
    with grpc.insecure_channel(runner_address, options=CHANNEL_OPTIONS) as channel:
        trace = runner_pb2_grpc.RunnerServiceStub(channel).TraceStep(
            runner_pb2.TraceStepRequest(prompt_token_ids=ids), timeout=600
        )
    print(f"architecture {trace.architecture}")
    for stage in trace.stages:
        print(table(stage))
        print()
    for path in write_all(trace, Path(args.out)):
        print(f"wrote {path}")
    return 0
