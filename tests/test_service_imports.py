"""The package order service -> workers -> igat_core, and a service that imports neither torch nor ray.

- igat_core imports neither service nor workers, and workers never imports service: read from the source of
  every module (its AST), so an import inside a function, under TYPE_CHECKING or through
  ``importlib.import_module("...")`` counts as much as one at the top;
- the service, its dispatcher and the composed ``igat`` program import neither torch nor ray, nor MLflow (checked in
  a fresh interpreter);
- igat_core/rundir.py owns the run directory: no other module of the scanned packages writes a run-directory
  file name in a string (docstrings aside) or calls ``os.replace``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from igat_core import rundir

try:
    from tests.service_fixtures import ROOT
except ImportError:
    from service_fixtures import ROOT

CHECK = """
import json, sys
import service.app, service.main, service.api, service.cli, service.store, service.db, service.dispatcher
import workers.executors, workers.executors.local
service.cli.igat_app()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "torchvision", "torchattacks", "mlflow"))
print(json.dumps(heavy))
"""

DYNAMIC_IMPORTS = {"import_module", "__import__"}

#: Packages whose modules must leave the run directory's file names and its atomic replace to igat_core/rundir.py.
RUNDIR_SCANNED_PACKAGES = ("igat_core", "service", "workers")
#: Modules of those packages that the rule does not cover (yet), relative to the repository root.
RUNDIR_EXEMPT_FILES = frozenset({"igat_core/rundir.py"})
RUN_DIR_FILE_NAMES = (
    rundir.SPEC_FILE, rundir.STATE_FILE, rundir.EVENTS_FILE, rundir.METRICS_FILE, rundir.TUNE_FILE,
    rundir.EVALUATION_FILE, rundir.RESULTS_FILE, rundir.REPORT_FILE, rundir.ENSEMBLE_FILE, rundir.LAST_CHECKPOINT,
    rundir.SCORE_FILE, rundir.HANDLE_FILE, rundir.STDOUT_LOG, rundir.STDERR_LOG, rundir.JOB_LOG, rundir.STUDY_FILE,
)
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def test_service_and_dispatcher_stay_light(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGAT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_igat_core_imports_neither_service_nor_workers() -> None:
    assert layer_crossings("igat_core", forbidden={"service", "workers"}) == []


def test_workers_never_import_service() -> None:
    assert layer_crossings("workers", forbidden={"service"}) == []


def test_only_rundir_names_run_directory_files_and_replaces_them() -> None:
    assert rundir_rule_breaks() == []


def layer_crossings(package: str, forbidden: set[str]) -> list[str]:
    """``file:line imports module`` for every import of a ``forbidden`` package by a module of ``package``."""
    files = sorted((ROOT / package).rglob("*.py"))
    assert len(files) > 3, f"no modules found under {ROOT / package}"
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in files for line, module in imported_modules(path)
            if module.split(".")[0] in forbidden]


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import written in ``path``, wherever it stands in the file."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and dynamic_import_target(node):
            yield node.lineno, dynamic_import_target(node)


def dynamic_import_target(call: ast.Call) -> str:
    """The literal module name of ``importlib.import_module("x")`` or ``__import__("x")``; "" for other calls."""
    function = call.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    if name not in DYNAMIC_IMPORTS or not call.args:
        return ""
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""


def rundir_rule_breaks() -> list[str]:
    """``file:line what`` for each run-directory file name or ``os.replace`` outside igat_core/rundir.py."""
    files = [path for package in RUNDIR_SCANNED_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             if path.relative_to(ROOT).as_posix() not in RUNDIR_EXEMPT_FILES]
    assert len(files) > 3, f"no modules found under {RUNDIR_SCANNED_PACKAGES}"
    return [f"{path.relative_to(ROOT)}:{line} {what}" for path in files for line, what in rundir_rule_breaks_in(path)]


def rundir_rule_breaks_in(path: Path) -> Iterator[tuple[int, str]]:
    """(line, what) of each string but a docstring naming a run-directory file, and each use of os.replace."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, DOCUMENTED) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield from ((node.lineno, f"names {name} (use igat_core.rundir's constant)")
                        for name in RUN_DIR_FILE_NAMES if name in node.value)
        elif isinstance(node, ast.Attribute) and node.attr == "replace" and getattr(node.value, "id", "") == "os":
            yield node.lineno, "calls os.replace (use igat_core.rundir.replacing)"
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name == "replace" for a in node.names):
            yield node.lineno, "imports os.replace (use igat_core.rundir.replacing)"
