"""The repository's own rules, checked on its files: imports point down (no cycle between modules
of titan_v4 or custom_ops, and no folder imports one above it: docs/design.md, "Layout"), and every
document a comment or doc cites lives in this repository."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("titan_v4", "custom_ops")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".cfg"}
SCANNED = ("titan_v4", "custom_ops", "tests", "docs", "train_configs", "benchmarks", "README.md", "run_train.sh", "pyproject.toml")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `name` imports, anywhere in its file (TYPE_CHECKING too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` names a submodule when one exists, else an attribute of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` imports the module a.b.c (or a.b)
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles():
    known = package_modules()
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert len(graph) > 20  # the walk saw the packages


# Which folders a folder must not import from (docs/design.md, "Layout"): the rooms point down,
# custom_ops -> model -> checkpoint / infra -> train -> planner -> tools, with data on its own
# beside them.
FORBIDDEN_IMPORTS = {
    "custom_ops": ("titan_v4",),
    "titan_v4.model": ("titan_v4.checkpoint", "titan_v4.data", "titan_v4.infra", "titan_v4.train", "titan_v4.planner", "titan_v4.tools"),
    "titan_v4.checkpoint": ("titan_v4.data", "titan_v4.infra", "titan_v4.train", "titan_v4.planner", "titan_v4.tools"),
    "titan_v4.data": ("titan_v4.model", "titan_v4.checkpoint", "titan_v4.infra", "titan_v4.train", "titan_v4.planner", "titan_v4.tools"),
    "titan_v4.infra": ("titan_v4.checkpoint", "titan_v4.data", "titan_v4.train", "titan_v4.planner", "titan_v4.tools"),
    "titan_v4.train": ("titan_v4.planner", "titan_v4.tools"),
    "titan_v4.planner": ("titan_v4.tools",),
}


def _within(module: str, folder: str) -> bool:
    return module == folder or module.startswith(folder + ".")


def folder_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} imports {target}"
        for name, targets in sorted(graph.items())
        for folder, banned in FORBIDDEN_IMPORTS.items()
        if _within(name, folder)
        for target in sorted(targets)
        if any(_within(target, b) for b in banned)
    ]


def test_folders_import_only_downwards():
    known = package_modules()
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    assert folder_violations(graph) == []
    # The rule can fail: a model module that imported the trainer would be named.
    assert folder_violations({"titan_v4.model.moe": {"titan_v4.train.trainer"}}) == ["titan_v4.model.moe imports titan_v4.train.trainer"]
    assert folder_violations({"custom_ops.mhc.ops": {"titan_v4.config"}}) == ["custom_ops.mhc.ops imports titan_v4.config"]


def test_nothing_imports_the_benchmarks():
    """benchmarks/ is a leaf: scripts run with `python -m benchmarks.<name>`, imported by no package or test."""
    known = {module_name(p): p for p in sorted((REPO / "benchmarks").rglob("*.py"))}
    assert known, "no benchmarks found"
    importers = []
    for folder in (*PACKAGES, "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if imported_modules(module_name(path), path, known):
                importers.append(str(path.relative_to(REPO)))
    assert importers == []


def scanned_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        path = REPO / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


# Design notes that live outside the repository; the code must cite docs/ instead.
OUTSIDE = re.compile(r"\bDESIGN\.md|\bV4_REFERENCE\b|\bTORCHTITAN_NOTES\b|\.\./shared")
CITED_DOC = re.compile(r"\bdocs/[\w./-]+\.md")


def test_citations_stay_inside_the_repository():
    this_file = Path(__file__).resolve()
    outside, missing = [], []
    for path in scanned_files():
        if path == this_file:
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{lineno}"
            if OUTSIDE.search(line):
                outside.append(where)
            missing += [f"{where} ({doc})" for doc in CITED_DOC.findall(line) if not (REPO / doc).is_file()]
    assert outside == [], "citations of documents outside the repository: " + ", ".join(outside)
    assert missing == [], "citations of docs/ files that do not exist: " + ", ".join(missing)
