"""Render a forward-pass trace (runner_pb2.TraceStepResponse): table, JSON, Mermaid, Graphviz."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from llmexec.v1 import runner_pb2


def tensor_text(infos) -> str:
    return ", ".join(f"[{', '.join(str(d) for d in t.shape)}] {t.dtype}" for t in infos) or "-"


def table(stage: runner_pb2.TraceStage) -> str:
    header = f"{'#':>4}  {'module':<44} {'class':<22} {'input':<40} {'output':<40} {'ms':>8}"
    lines = [f"== {stage.stage}: {stage.num_tokens} tokens in the flattened batch, sampled {stage.sampled_token_id}",
             header, "-" * len(header)]
    for call in stage.calls:
        name = ("  " * call.depth + (call.name or "<model>"))[:44]
        lines.append(f"{call.index:>4}  {name:<44} {call.class_name[:22]:<22} {tensor_text(call.inputs)[:40]:<40} "
                     f"{tensor_text(call.outputs)[:40]:<40} {call.seconds * 1e3:>8.3f}")
    return "\n".join(lines)


def to_json(trace: runner_pb2.TraceStepResponse) -> str:
    return json.dumps(MessageToDict(trace, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
                      indent=1)


def _node_id(stage: str, call: runner_pb2.ModuleCall) -> str:
    return f"{stage}_{call.index}"


def mermaid(trace: runner_pb2.TraceStepResponse) -> str:
    """A flowchart of the modules traversed: containers as nested subgraphs, leaf calls chained in order."""
    lines = ["flowchart TD"]
    for stage in trace.stages:
        lines.append(f'  subgraph {stage.stage}["{stage.stage} ({stage.num_tokens} tokens)"]')
        open_depths: list[int] = []
        leaves = []
        calls = list(stage.calls)
        for i, call in enumerate(calls):
            while open_depths and open_depths[-1] >= call.depth:
                open_depths.pop()
                lines.append("  end")
            has_children = i + 1 < len(calls) and calls[i + 1].depth > call.depth
            label = f"{call.name or '&lt;model&gt;'}<br/>{call.class_name}"
            if has_children:
                lines.append(f'  subgraph {_node_id(stage.stage, call)}["{label}"]')
                open_depths.append(call.depth)
            else:
                io = f"{tensor_text(call.inputs)} → {tensor_text(call.outputs)}"
                lines.append(f'  {_node_id(stage.stage, call)}["{label}<br/>{io}"]')
                leaves.append(_node_id(stage.stage, call))
        lines.extend("  end" for _ in open_depths)
        lines.append("  end")
        lines.extend(f"  {a} --> {b}" for a, b in zip(leaves, leaves[1:]))
    return "\n".join(lines) + "\n"


def graphviz(trace: runner_pb2.TraceStepResponse) -> str:
    lines = ["digraph trace {", "  rankdir=TB; node [shape=box, fontsize=9];"]
    for stage in trace.stages:
        calls = list(stage.calls)
        leaves = [c for i, c in enumerate(calls) if not (i + 1 < len(calls) and calls[i + 1].depth > c.depth)]
        lines.append(f'  subgraph cluster_{stage.stage} {{ label="{stage.stage} ({stage.num_tokens} tokens)";')
        for call in leaves:
            label = f"{call.name}\\n{call.class_name}\\n{tensor_text(call.inputs)} -> {tensor_text(call.outputs)}"
            lines.append(f'    {_node_id(stage.stage, call)} [label="{label}"];')
        lines.append("  }")
        lines.extend(f"  {_node_id(stage.stage, a)} -> {_node_id(stage.stage, b)};" for a, b in zip(leaves, leaves[1:]))
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_all(trace: runner_pb2.TraceStepResponse, out_dir: Path) -> list[Path]:
    """Write trace.json, trace.mmd, trace.dot, and trace.png when Graphviz's `dot` is installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("trace.json", to_json(trace)), ("trace.mmd", mermaid(trace)), ("trace.dot", graphviz(trace))):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    dot = shutil.which("dot")
    if dot:
        subprocess.run([dot, "-Tpng", str(out_dir / "trace.dot"), "-o", str(out_dir / "trace.png")], check=True)
        written.append(out_dir / "trace.png")
    return written
