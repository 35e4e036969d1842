"""Every third-party module the package imports is a declared runtime dependency (a module only the
test extra brought in would pass the tests and fail a user's `python -m bh_routing demo`)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
IMPORT_NAME = {"pyyaml": "yaml"}                 # distribution -> module, where they differ
# imported only where they exist, each behind a guard: the lm-eval backend (the `lm-eval` extra),
# notebooks' front ends (IPython, Colab's google.colab, ipywidgets — only where runtime.interactive()
# found it), and transformers' own dependencies
OPTIONAL = {"lm_eval", "IPython", "google", "huggingface_hub", "packaging", "ipywidgets"}


def imported_modules() -> set[str]:
    names = set()
    for path in (REPO / "bh_routing").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"bh_routing"}


def declared(requirements: list[str]) -> set[str]:
    names = {re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in requirements if line.strip()}
    return {IMPORT_NAME.get(name, name.replace("-", "_")) for name in names}


def test_every_imported_module_is_a_runtime_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    missing = imported_modules() - declared(project["dependencies"]) - OPTIONAL
    assert not missing, f"bh_routing imports {sorted(missing)}, which pyproject.toml's dependencies do not declare"


def test_requirements_file_lists_the_same_runtime_dependencies_less_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [line.split("#")[0] for line in (REPO / "requirements_bh.txt").read_text().splitlines()]
    assert declared(lines) == declared(project["dependencies"]) - {"torch"}
