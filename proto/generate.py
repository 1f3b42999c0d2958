"""Generate the gRPC, protobuf and typing modules for `proto/chasqui.proto`.

Usage: python proto/generate.py [OUTPUT_DIR]   (default: chasqui_proto/)

protoc writes `import chasqui_pb2`, which only works when the output folder is on sys.path;
the import is rewritten to the package-qualified form so both chasqui_node and chasqui_client
can import the modules from the `chasqui_proto` package. A test regenerates into a temporary
folder and compares, so committed modules never go stale.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("chasqui_pb2.py", "chasqui_pb2.pyi", "chasqui_pb2_grpc.py", "chasqui_pb2_grpc.pyi")


def generate(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    # mypy-protobuf's plugins are found on PATH; put this interpreter's scripts first.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    arguments = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={output_dir}",
        f"--grpc_python_out={output_dir}",
        f"--mypy_out={output_dir}",
        f"--mypy_grpc_out={output_dir}",
        str(ROOT / "proto" / "chasqui.proto"),
    ]
    if protoc.main(arguments) != 0:
        raise SystemExit("protoc failed")
    for name in ("chasqui_pb2_grpc.py", "chasqui_pb2_grpc.pyi"):
        path = output_dir / name
        text = path.read_text()
        text = text.replace("import chasqui_pb2 as", "from chasqui_proto import chasqui_pb2 as")
        path.write_text(text)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "chasqui_proto")
