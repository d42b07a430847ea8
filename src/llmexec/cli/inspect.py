"""`llmexec inspect MODEL`: parameters by layer type, weight bytes per precision, KV cache per token.

Runs the loader's analyzer in this process, or asks a running loader
(`--loader ADDRESS`, the InspectModel RPC) about a path on its machine.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '512 MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 24GiB, 80GB or 1e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="count a model's parameters and size its weights and KV cache (loads nothing)")
    p.add_argument("model", help="HF folder, .gguf file, config.json, or a model id in the local HF cache")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--memory", type=parse_bytes, default=0,
                   help="memory for weights + KV cache, e.g. 80GB or 24GiB: reports how many tokens of KV cache fit")
    p.add_argument("--kv-cache-dtype", default="bfloat16")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="also size one rank of the model split over this many ranks (--memory is then per device)")
    p.add_argument("--loader", default="", help="ask the loader at this address instead of reading here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.loader:
        report = _ask_loader(args)
    else:
        from llmexec.loader.model_inspector import inspect_model

        report = asdict(inspect_model(args.model, args.load_format, args.memory, args.kv_cache_dtype,
                                      args.tensor_parallel_size))
    print(json.dumps(report, indent=2) if args.json else "\n".join(format_report(report)))
    return 0


def _ask_loader(args: argparse.Namespace) -> dict:
    import grpc

    from llmexec.v1 import loader_pb2, loader_pb2_grpc

    request = loader_pb2.InspectModelRequest(model=args.model, load_format=args.load_format,
                                             memory_bytes=args.memory, kv_cache_dtype=args.kv_cache_dtype,
                                             tensor_parallel_size=args.tensor_parallel_size)
    with grpc.insecure_channel(args.loader) as channel:
        reply = loader_pb2_grpc.LoaderServiceStub(channel).InspectModel(request, timeout=300)
    return report_from_pb(reply)


def report_from_pb(reply) -> dict:
    """InspectModelResponse -> the dict asdict(ModelReport) gives, field for field."""
    scalars = ("source", "architecture", "parameter_source", "load_format", "parameter_count", "num_layers",
               "num_kv_heads", "head_dim", "kv_cache_dtype", "kv_cache_bytes_per_token", "memory_bytes",
               "tensor_parallel_size", "rank_parameter_count", "rank_kv_cache_bytes_per_token")
    report = {name: getattr(reply, name) for name in scalars}
    report["tensor_parallel_size"] = report["tensor_parallel_size"] or 1
    report["parameter_groups"] = [
        {"layer_type": g.layer_type, "parameter_count": g.parameter_count, "share": g.share}
        for g in reply.parameter_groups
    ]
    for key in ("footprints", "rank_footprints"):
        report[key] = [
            {"precision": f.precision, "weight_bytes": f.weight_bytes, "kv_cache_tokens": f.kv_cache_tokens}
            for f in getattr(reply, key)
        ]
    return report


def format_report(report: dict) -> list[str]:
    """The report (ModelReport as a dict) as the table the command prints."""
    total = report["parameter_count"]
    lines = [
        f"{report['architecture']}  {report['source']}",
        f"parameters: {total:,} " + (
            "(from the config: the architecture built with shapes only)" if report["parameter_source"] == "config"
            else f"(counted from the checkpoint's tensors, {report['load_format']})"
        ),
        f"  {'layer type':<12}{'parameters':>16}{'share':>9}",
    ]
    for group in report["parameter_groups"]:
        share = f"{group['share']:.2%}" if group["share"] >= 1e-4 else f"{group['share']:.4%}"
        lines.append(f"  {group['layer_type']:<12}{group['parameter_count']:>16,}{share:>9}")
    lines.append(
        f"KV cache: {report['kv_cache_bytes_per_token']:,} bytes per token in {report['kv_cache_dtype']} "
        f"(K and V x {report['num_layers']} layers x {report['num_kv_heads']} KV heads x {report['head_dim']} head dim)"
    )
    memory = report["memory_bytes"]
    lines += _footprint_table(report["footprints"], memory, "weights at")
    size = report.get("tensor_parallel_size", 1)
    if size > 1:
        lines.append(
            f"tensor parallel {size}: each rank holds {report['rank_parameter_count']:,} parameters and "
            f"{report['rank_kv_cache_bytes_per_token']:,} bytes of KV cache per token"
        )
        lines += _footprint_table(report["rank_footprints"], memory, "rank at")
    return lines


def _footprint_table(rows: list[dict], memory: int, title: str) -> list[str]:
    header = f"  {title:<12}{'bytes':>18}{'':>12}"
    if memory:
        header += f"{f'KV tokens in {_human(memory)}':>26}"
    lines = [header]
    for row in rows:
        line = f"  {row['precision']:<12}{row['weight_bytes']:>18,}{_human(row['weight_bytes']):>12}"
        if memory:
            line += f"{row['kv_cache_tokens']:>26,}" if row["kv_cache_tokens"] else f"{'weights do not fit':>26}"
        lines.append(line)
    return lines


def _human(num_bytes: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"
