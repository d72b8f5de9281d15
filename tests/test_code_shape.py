"""The code stays readable: no function in the Runner or the workers is longer than a screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 50
#: Files (globs relative to the repository root) whose functions must stay within MAX_FUNCTION_LINES.
SHORT_FUNCTION_FILES = ("igat_core/runner.py", "igat_core/results.py", "igat_core/rundir.py", "igat_core/study*.py",
                        "igat_core/stats.py", "workers/**/*.py", "service/tracking.py")


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (n lines)`` for every function or method of ``path`` longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_of_the_runner_or_the_workers_is_longer_than_fifty_lines() -> None:
    files = sorted({path for pattern in SHORT_FUNCTION_FILES for path in ROOT.glob(pattern)})
    assert len(files) > 5, f"no files matched {SHORT_FUNCTION_FILES}"
    assert [line for path in files for line in long_functions(path)] == []


def test_a_long_function_is_reported(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = ROOT / "tests" / f"_long_{tmp_path.name}.py"
    path.write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    try:
        assert long_functions(path) == [f"{path.relative_to(ROOT)}:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
    finally:
        path.unlink()
