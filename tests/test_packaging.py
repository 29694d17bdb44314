"""The install declares what the code needs: every third-party module `pas/` imports is a declared
dependency of the package (not of the test extra), and environment.yml and the workflow's conda env
list the same packages as pyproject.toml."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names of the pip distributions, where they differ
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}
# needed without being imported by pas/: torch.onnx.export writes the ONNX file with onnx, pandas
# writes Markdown with tabulate and LaTeX with jinja2
RUNTIME_ONLY = {"onnx", "tabulate", "jinja2"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def imported_distributions() -> dict[str, set[str]]:
    modules = set()
    for path in (ROOT / "pas").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"pas"}
    found = md.packages_distributions()
    return {m: {d.lower() for d in found.get(m, [])} for m in modules}


def test_every_module_pas_imports_is_a_declared_dependency():
    declared = {_name(r) for r in pyproject()["project"]["dependencies"]}
    for module, dists in sorted(imported_distributions().items()):
        assert dists, f"{module!r} is imported by pas/ but not installed"
        assert dists & declared, f"pas/ imports {module!r} (from {sorted(dists)}), not in [project.dependencies]"
    assert RUNTIME_ONLY <= declared


def _conda(path: Path) -> set[str]:
    deps = yaml.safe_load(path.read_text())["dependencies"]
    names = {_name(d) for d in deps if isinstance(d, str)}
    for d in deps:
        if isinstance(d, dict):
            names |= {_name(p) for p in d["pip"] if not p.startswith("-")}
    return names - {"python", "pip"}


def test_conda_environments_match_pyproject():
    project = pyproject()["project"]
    core = {CONDA_NAMES.get(_name(r), _name(r)) for r in project["dependencies"]}
    workflow = {_name(r) for r in project["optional-dependencies"]["workflow"]}
    assert _conda(ROOT / "environment.yml") == core | workflow
    assert _conda(ROOT / "workflow" / "envs" / "pas.yaml") == core
