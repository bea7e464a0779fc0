"""Regenerate the checked-in Python code for proto/taps/drafter/v1/drafter.proto.

    python proto/generate.py          # writes proto/taps/drafter/v1/drafter_pb2*.py
    python proto/generate.py --check  # fails if the checked-in code is stale

The generated modules are checked in (so a deploy needs no code generation) and are
produced with grpcio-tools 1.85.1 (pinned in pyproject.toml), which this script uses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO = "taps/drafter/v1/drafter.proto"
OUTPUTS = ("drafter_pb2.py", "drafter_pb2.pyi", "drafter_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # the generated grpc module imports `taps.drafter.v1.drafter_pb2`; make it package-relative
    grpc_file = out_dir / "taps/drafter/v1/drafter_pb2_grpc.py"
    text = grpc_file.read_text().replace("from taps.drafter.v1 import drafter_pb2",
                                         "from proto.taps.drafter.v1 import drafter_pb2")
    grpc_file.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in OUTPUTS:
            new = (Path(tmp) / "taps/drafter/v1" / name).read_text()
            target = ROOT / "taps/drafter/v1" / name
            if args.check:
                if not target.exists() or target.read_text() != new:
                    stale.append(name)
            else:
                target.write_text(new)
    if stale:
        print(f"stale generated code: {stale}; run python proto/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
