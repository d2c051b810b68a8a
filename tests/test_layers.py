"""DESIGN.md's layering, read from the source: data never imports engine, model imports neither data nor engine,
and the HF stack (transformers, peft, accelerate, trl) appears only in engine/bench.py, where it is the reference
the benchmark measures against. Every import counts, also one inside a function."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HF_STACK = {"transformers", "peft", "accelerate", "trl"}
FORBIDDEN = {"data": {"engine"}, "model": {"data", "engine"}, "engine": set()}


def imported(path: Path) -> set[str]:
    """Top-level package names a module imports anywhere in its body (relative imports: its own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(path.parent.name if node.level else (node.module or "").split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package):
    found = {f"{p.relative_to(ROOT)} imports {name}" for p in modules(package) for name in imported(p)
             if name in FORBIDDEN[package]}
    assert not found, sorted(found)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_hf_stack_only_as_the_benchmarks_reference(package):
    found = {f"{p.relative_to(ROOT)} imports {name}" for p in modules(package) for name in imported(p) & HF_STACK
             if p.relative_to(ROOT) != Path("engine/bench.py")}
    assert not found, sorted(found)


def test_nothing_unpickles():
    found = [str(p.relative_to(ROOT)) for pkg in FORBIDDEN for p in modules(pkg) if "pickle" in imported(p)]
    assert not found, found


def test_the_check_sees_a_violation(tmp_path):
    """imported() finds a function-local import and a relative one, so the tests above can fail."""
    (tmp_path / "data").mkdir()
    bad = tmp_path / "data" / "x.py"
    bad.write_text("def f():\n    from engine.cli import run_command\n    from . import io\n")
    assert imported(bad) == {"engine", "data"}
