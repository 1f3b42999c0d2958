"""The committed chasqui_proto modules are what `make proto` generates from proto/chasqui.proto.

Regenerates into a temporary folder with the pinned grpcio-tools and compares file by file, so a
schema change without `make proto` fails here instead of at a client's import.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def load_generator() -> object:
    spec = importlib.util.spec_from_file_location(
        "chasqui_generate", ROOT / "proto" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_generated_modules_match_the_schema(tmp_path: Path) -> None:
    generator = load_generator()
    generator.generate(tmp_path)  # type: ignore[attr-defined]
    for name in generator.GENERATED:  # type: ignore[attr-defined]
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "chasqui_proto" / name).read_text()
        assert committed == fresh, f"chasqui_proto/{name} is stale: run `make proto`"
