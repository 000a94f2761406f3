#!/usr/bin/env python3
"""Regenerate ``generated/`` from ``proto/``.

Produces, for every ``proto/automator67/v1/*.proto``:

- ``*_pb2.py`` messages, ``*_pb2_grpc.py`` stubs and servicers,
- ``*_pb2.pyi`` / ``*_pb2_grpc.pyi`` type stubs (mypy-protobuf),
- ``generated/automator67.binpb``: a descriptor set with all imports, which
  Envoy's ``grpc_json_transcoder`` loads (it includes ``google.rpc`` error
  detail types so that transcoded error bodies can render them).

It also refreshes ``third_party/googleapis`` (the few ``google/api`` and
``google/rpc`` protos we import) from the installed googleapis-common-protos
package, so that ``buf lint`` resolves the imports without network access.

Never edit ``generated/`` by hand; CI runs this script and fails on any diff.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
from google.api import annotations_pb2  # googleapis-common-protos
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "generated"
THIRD_PARTY = ROOT / "third_party" / "googleapis"
VENDORED = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
)
# Detail types Envoy must know to render google.rpc.Status bodies.
EXTRA_DESCRIPTOR_FILES = ("google/rpc/error_details.proto", "google/rpc/status.proto")


def _vendor_googleapis() -> None:
    source = Path(annotations_pb2.__file__).resolve().parent.parent.parent
    for rel in VENDORED:
        target = THIRD_PARTY / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target)


def _run_protoc(args: list[str]) -> None:
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    argv = ["protoc", f"-I{PROTO}", f"-I{THIRD_PARTY}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        sys.exit(f"protoc failed: {' '.join(argv)}")


def main() -> None:
    _vendor_googleapis()
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    bin_dir = Path(sys.executable).parent
    _run_protoc(
        [
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={OUT}",
            f"--mypy_grpc_out={OUT}",
            *protos,
        ]
    )
    _run_protoc(
        [
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={OUT / 'automator67.binpb'}",
            *protos,
            *EXTRA_DESCRIPTOR_FILES,
        ]
    )
    for package in {p.parent for p in OUT.rglob("*_pb2.py")} | {OUT / "automator67"}:
        (package / "__init__.py").write_text(
            '"""Generated from proto/ by scripts/gen_protos.py; do not edit."""\n'
        )
    print(f"generated {len(protos)} proto files into {OUT.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
