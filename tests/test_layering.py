"""The package layering, checked statically: every import statement of every .py file under taps/ and
actors/ (module level or inside functions, `import x`, `from x import y`, relative imports resolved,
and importlib.import_module / __import__ with a literal name), no module imported or run.

    taps     the pure-PyTorch core: no Ray, gRPC / protobuf, DeepSpeed, FastAPI, nor any package above it
    actors   Ray actors over the core: no cluster, cli, eval or training
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "taps": {"ray", "grpc", "grpc_health", "google", "proto", "deepspeed", "fastapi",
             "actors", "cluster", "training", "eval", "cli"},
    "actors": {"cluster", "cli", "eval", "training"},
}


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def imported_modules(path: Path, root: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in `path`, a file of a package under `root`."""
    module, is_package = _module_name(path, root)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:max(0, len(base) - (node.level - 1))]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            # `from . import x` / `from pkg import x`: x may be a module
            found += [(f"{name}.{alias.name}" if name else alias.name, node.lineno) for alias in node.names
                      if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called in ("import_module", "__import__"):
                found.append((node.args[0].value, node.lineno))
    return sorted(found, key=lambda f: f[1])


def layering_violations(root: Path, forbidden: dict[str, set[str]] = FORBIDDEN) -> list[str]:
    out = []
    for package, banned in forbidden.items():
        for path in sorted((root / package).rglob("*.py")):
            seen = set()
            for name, line in imported_modules(path, root):
                top = name.split(".")[0]
                if top in banned and (line, top) not in seen:
                    seen.add((line, top))
                    out.append(f"{path.relative_to(root)}:{line}: {package} imports {name}")
    return out


def test_core_and_actors_import_only_what_their_layer_allows():
    violations = layering_violations(ROOT)
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_the_check_finds_every_kind_of_import(tmp_path):
    """The checker itself, on a fake tree: each kind of import is caught and named file:line."""
    (tmp_path / "taps" / "models").mkdir(parents=True)
    (tmp_path / "actors").mkdir()
    (tmp_path / "taps" / "__init__.py").write_text("")
    (tmp_path / "taps" / "models" / "__init__.py").write_text("from . import llama\n")
    (tmp_path / "taps" / "models" / "bad.py").write_text(
        "import torch\n"
        "import ray.serve\n"
        "from taps.models import llama\n"
        "def f():\n"
        "    from cluster.registry import Registry\n"
        "    from ... import eval\n"
        "    from ...training import features\n"
        "class C:\n"
        "    def g(self):\n"
        "        import importlib\n"
        "        return importlib.import_module('grpc'), __import__('cli.main')\n")
    (tmp_path / "actors" / "a.py").write_text("from taps.engine import TapsEngine\nimport ray\n\n"
                                              "def h():\n    import training.train_drafter\n")
    got = layering_violations(tmp_path)
    assert got == [
        "taps/models/bad.py:2: taps imports ray.serve",
        "taps/models/bad.py:5: taps imports cluster.registry",
        "taps/models/bad.py:6: taps imports eval",
        "taps/models/bad.py:7: taps imports training",
        "taps/models/bad.py:11: taps imports grpc",
        "taps/models/bad.py:11: taps imports cli.main",
        "actors/a.py:5: actors imports training.train_drafter",
    ], got
