"""Regenerate the Python code and type stubs for protos/ into src/.

Run after editing a .proto file: `python scripts/generate_protos.py`.
tests/test_protos.py fails when the checked-in code is out of date.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PACKAGE_DIR = Path("llmexec") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Write <name>_pb2.py, .pyi, _pb2_grpc.py and .pyi under out_root/llmexec/v1."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    plugin = shutil.which("protoc-gen-mypy_grpc")
    if plugin is None:
        raise SystemExit("protoc-gen-mypy_grpc not found: pip install mypy-protobuf")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    init = out_root / PACKAGE_DIR / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC code for package llmexec.v1 (see protos/)."""\n')
    return sorted((out_root / PACKAGE_DIR).iterdir())


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "src"
    for path in generate(out):
        print(path.relative_to(out))
