"""Generate ``ares_pb2.py`` / ``ares_pb2_grpc.py`` from ``protos/ares.proto`` with grpcio-tools.

The generated modules are committed (so an install needs no code generation step);
``tests/test_serving_proto.py`` regenerates them into a temporary folder and fails if the
committed ones differ. Run ``python -m ares_jax.serving.codegen`` after editing the proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
PROTO_DIR = HERE / "protos"


def generate(out_dir: Path = HERE) -> list[Path]:
    """Write the two modules into ``out_dir``; returns their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", str(PROTO_DIR / "ares.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    grpc_mod = out_dir / "ares_pb2_grpc.py"
    # protoc writes a top-level import; the package needs a relative one.
    text = grpc_mod.read_text().replace("import ares_pb2 as ares__pb2",
                                        "from . import ares_pb2 as ares__pb2")
    grpc_mod.write_text(text)
    return [out_dir / "ares_pb2.py", grpc_mod]


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path}")
    sys.exit(0)
