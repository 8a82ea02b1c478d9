"""The import rules of README's "Architecture": every arrow between utils' sub-packages points down the stages, no
module imports a script, and no import cycle exists between modules (imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# sub-package -> the sub-packages it may import (besides the plumbing modules cli, errors, fileio and models/)
ALLOWED = {
    "data": set(),
    "inference": {"data"},
    "quant": {"data", "inference"},
    "sensitivity": {"data", "inference", "quant"},
    "fallback": {"data", "inference", "quant", "sensitivity"},
    "deploy": {"data", "inference", "quant"},
    "training": {"data", "inference", "quant"},  # quantization-aware fine-tuning trains a quantized model
}
PLUMBING = {"utils.cli", "utils.errors", "utils.fileio"}
SCRIPTS = {p.stem for p in REPO.glob("*.py")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file (``from utils.quant import calibration``
    counts as utils.quant.calibration)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _project_modules() -> dict[str, Path]:
    files = [*REPO.joinpath("utils").rglob("*.py"), *REPO.joinpath("models").rglob("*.py")]
    return {_module_name(p): p for p in files}


def test_utils_sub_packages_import_down_the_stages_only():
    modules = _project_modules()
    problems = []
    for name, path in modules.items():
        parts = name.split(".")
        if parts[0] != "utils" or len(parts) < 3 and name not in ("utils.sensitivity",):
            continue
        own = parts[1]
        for target in _imports(path) & set(modules):
            tparts = target.split(".")
            if tparts[0] != "utils" or target in PLUMBING or target == "utils" or tparts[1] == own:
                continue
            if tparts[1] not in ALLOWED.get(own, set()):
                problems.append(f"{name} imports {target}")
    assert not problems, problems


def test_no_module_imports_a_script():
    for name, path in _project_modules().items():
        bad = {target for target in _imports(path) if target.split(".")[0] in SCRIPTS}
        assert not bad, f"{name} imports script(s) {bad}"


def test_no_import_cycle_between_modules():
    modules = _project_modules()
    graph = {name: {t for t in _imports(path) if t in modules and t != name} for name, path in modules.items()}
    # a package's __init__ is imported with each of its modules: an edge to utils.x.y implies one to utils.x
    for name, targets in graph.items():
        for target in list(targets):
            parent = target.rpartition(".")[0]
            if parent in modules and parent != name and not name.startswith(parent + "."):
                targets.add(parent)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]
                                                                    if nxt in trail else [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_utils_module_is_over_600_lines():
    long = {name: n for name, path in _project_modules().items()
            if name.startswith("utils") and (n := len(path.read_text().splitlines())) > 600}
    assert not long, long
