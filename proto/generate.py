"""Regenerate the checked-in Python code for proto/taps/drafter/v1/drafter.proto.

    python proto/generate.py          # writes proto/taps/drafter/v1/drafter_pb2{.py,.pyi,_grpc.py}
    python proto/generate.py --check  # exit 1 if the checked-in code differs from a fresh generation

The generated modules are checked in, so installing or deploying needs no code generation.
Output is reproducible only with the pinned generator (its protoc version is written into the
files), so this script refuses any other grpcio-tools version. grpcio-tools 1.85.1 requires
protobuf >=7.35.1,<8 and sits in the project venv; if it ever conflicts, use a throwaway venv:

    python -m venv /tmp/protogen && /tmp/protogen/bin/pip install grpcio-tools==1.85.1
    /tmp/protogen/bin/python proto/generate.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.85.1"  # keep equal to the pin in pyproject.toml
ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = "taps/drafter/v1"
PROTO = f"{PACKAGE_DIR}/drafter.proto"
OUTPUTS = ("drafter_pb2.py", "drafter_pb2.pyi", "drafter_pb2_grpc.py")


def generator_version() -> str | None:
    """Installed grpcio-tools version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grpcio-tools")
    except PackageNotFoundError:
        return None


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) into out_dir/taps/drafter/v1/."""
    found = generator_version()
    if found != GRPCIO_TOOLS_VERSION:
        raise SystemExit(f"proto/generate.py needs grpcio-tools=={GRPCIO_TOOLS_VERSION}, found {found}")
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # the generated grpc module imports `taps.drafter.v1.drafter_pb2`, which would shadow the core
    # package `taps`; make it import from the `proto` package instead
    grpc_file = out_dir / PACKAGE_DIR / "drafter_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed = text.replace("from taps.drafter.v1 import drafter_pb2", "from proto.taps.drafter.v1 import drafter_pb2")
    if fixed == text:
        raise SystemExit("unexpected import line in the generated grpc module; update proto/generate.py")
    grpc_file.write_text(fixed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the checked-in files")
    args = ap.parse_args(argv)
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in OUTPUTS:
            new = (Path(tmp) / PACKAGE_DIR / name).read_text()
            target = ROOT / PACKAGE_DIR / name
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
