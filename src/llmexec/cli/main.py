"""The `llmexec` command: up, status, down, generate, trace, inspect."""

from __future__ import annotations

import argparse
import signal
import sys
import time

import grpc

from llmexec.cli import stack
from llmexec.cli.generate import add_generate_parser, build_request, stream
from llmexec.cli.inspect import add_inspect_parser, cmd_inspect
from llmexec.cli.trace import add_trace_parser, cmd_trace
from llmexec.errors import LLMExecError
from llmexec.loader.checkpoint import LOAD_FORMATS
from llmexec.quantization import QUANTIZATION_HELP, QUANTIZATIONS


def add_up_parser(sub) -> None:
    p = sub.add_parser("up", help="start Redis, loader, runner and scheduler on this machine")
    p.add_argument("--model", default="", help="HF folder, .gguf file, config.json (with --load-format dummy) or a "
                   "model id in the local HF cache (default: the bundled SmolLM2 demo)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto picks safetensors, then pt (.bin), then gguf; dummy makes random weights from the config")
    p.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: float32 on cpu, "
                   "bfloat16 on cuda)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda[:N]: the loader keeps the weights on that GPU and the runner attaches to them "
                        "over CUDA IPC")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="with --device cuda and --num-blocks 0: the share of the GPU's memory in use once the "
                        "runner's KV cache is allocated (runner default 0.9)")
    p.add_argument("--quantization", default="", choices=["", *QUANTIZATIONS], help=QUANTIZATION_HELP)
    p.add_argument("--quantization-group-size", type=int, default=0, help="input columns per int4 scale (default 128)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many ranks: the loader keeps one shard per rank, the runner "
                        "runs one process per rank (gloo on CPU, NCCL on GPUs); the scheduler sees one runner")
    p.add_argument("--redis-url", default="", help="use this Redis instead of starting an embedded one")
    p.add_argument("--scheduler-port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--loader-port", type=int, default=50052, help="0 picks a free port")
    p.add_argument("--runner-port", type=int, default=50053, help="0 picks a free port")
    p.add_argument("--redis-port", type=int, default=0, help="embedded Redis port; 0 picks a free port")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=0, help="KV cache blocks; 0 sizes from --kv-cache-gib")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step (chunked prefill)")
    p.add_argument("--max-queue-len", type=int, default=None,
                   help="waiting requests before new ones get RESOURCE_EXHAUSTED (scheduler default 1024)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="scheduler's Prometheus /metrics port (default: a free one, see GetServerInfo)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for every service to serve")
    p.add_argument("--detach", action="store_true", help="return once serving; stop later with `llmexec down`")


def cmd_up(args: argparse.Namespace) -> int:
    try:
        check_device(args.device)
    except ValueError as exc:
        print(f"llmexec up: {exc}", file=sys.stderr)
        return 2
    if not args.model:
        from llmexec.demo_model import demo_model_path

        args.model = str(demo_model_path())
    opts = vars(args)
    if args.tensor_parallel_size > 1:
        check_tensor_parallel(args.model, args.load_format, args.tensor_parallel_size, str(opts.get("device") or ""))
    try:
        records = stack.up(opts)
    except RuntimeError as exc:
        print(f"llmexec up failed: {exc}", file=sys.stderr)
        stack.down()
        return 1
    for line in stack.describe(records):
        print(line, flush=True)
    if args.detach:
        print("detached; stop with `llmexec down`", flush=True)
        return 0
    print("serving; press Ctrl-C to stop", flush=True)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    exit_code = 0
    while not stop["now"]:
        time.sleep(0.5)
        dead = [name for name, rec in records.items() if not rec.alive()]
        if dead:
            print(f"{', '.join(dead)} exited unexpectedly; logs in {stack.state_dir() / 'logs'}", file=sys.stderr)
            exit_code = 1
            break
    stopped = stack.down(records)
    print(f"stopped {', '.join(stopped) or 'nothing'}")
    return exit_code


def check_device(device: str) -> None:
    """Refuse, before starting anything, a device this machine does not have (ValueError)."""
    if device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {device}: torch sees no CUDA device on this machine (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if index and int(index) >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA device(s)")


def check_tensor_parallel(model: str, load_format: str, size: int, device: str) -> None:
    """Refuse, before starting anything, a size the model does not split by (its heads, KV heads,
    intermediate size, an architecture without a plan) or that exceeds the devices."""
    from llmexec.loader.checkpoint import open_checkpoint
    from llmexec.models.config_keys import standard_config
    from llmexec.models.registry import model_class_for
    from llmexec.models.tensor_parallel import plan_for
    from llmexec.runner.tp_worker import check_devices

    checkpoint = open_checkpoint(model, load_format)
    plan_for(model_class_for(checkpoint.architecture, checkpoint.config), standard_config(checkpoint.config), size)
    check_devices(size, device if device.startswith("cuda") else "cpu")


def cmd_status(args: argparse.Namespace) -> int:
    records = stack.load_state()
    if not records:
        print("no stack is running (start one with `llmexec up --detach`)")
        return 1
    for line in stack.describe(records):
        print(line)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = stack.down()
    print(f"stopped {', '.join(stopped) or 'nothing'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    address = args.address
    if not address:
        rec = stack.load_state().get("scheduler")
        address = rec.address if rec else "127.0.0.1:50051"
    request = build_request(args)
    try:
        stream(address, request, args)
    except grpc.RpcError as exc:
        print(f"\n{exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmexec", description="LLM inference executor: loader, runner, scheduler")
    sub = parser.add_subparsers(dest="command", required=True)
    add_up_parser(sub)
    sub.add_parser("status", help="show each service of the running stack, its address, pid and health")
    sub.add_parser("down", help="stop a detached stack")
    add_generate_parser(sub)
    add_trace_parser(sub)
    add_inspect_parser(sub)
    args = parser.parse_args(argv)
    handlers = {"up": cmd_up, "status": cmd_status, "down": cmd_down, "generate": cmd_generate, "trace": cmd_trace,
                "inspect": cmd_inspect}
    try:
        return handlers[args.command](args)
    except LLMExecError as exc:
        print(f"llmexec {args.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"llmexec {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
