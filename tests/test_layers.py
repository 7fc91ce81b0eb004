"""The floors of the house (DESIGN.md), checked on the code's import statements, not on strings.

- the library (``shrinkflow/`` but its CLI) imports nothing above it: not ``tasks``,
  ``flows``, Prefect, DVC, GTO, Dask or Optuna;
- ``schemas`` imports only itself (and pydantic & co.);
- no import circles inside the library;
- each dvc.yaml stage lists every project file its command imports, and nothing else,
  so an edit reruns exactly the stages it can change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PACKAGES = ("shrinkflow", "schemas", "tasks", "flows")
#: What only the floors above the library may import.
ABOVE_LIBRARY = ("tasks", "flows", "prefect", "prefect_dask", "dvc", "dvc_s3", "gto", "dask", "distributed", "optuna")
#: The stage command's launcher: ``shrinkflow stage NAME`` hands over to ``tasks.run.main``
#: at once, so it is not part of any stage's code (editing another command reruns nothing).
LAUNCHERS = {"shrinkflow/cli.py", "shrinkflow/__main__.py"}


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's ``__init__.py``), or None outside the project."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _import_nodes(tree: ast.AST, top_level_only: bool):
    """Import statements of a module: all of them, or only those that run when it is imported."""
    if not top_level_only:
        yield from (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))
        return
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue  # a function body runs only when called
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module an import statement in ``path`` names (function-level imports included unless
    ``top_level_only``). ``from pkg import name`` names ``pkg.name`` when that is a module, else ``pkg``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in _import_nodes(tree, top_level_only):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative import
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for a in node.names:
            sub = f"{base}.{a.name}"
            found.add(sub if module_file(sub) is not None and module_file(sub) != module_file(base) else base)
        found.add(base + ".")  # the package itself runs (its top level), whatever is taken from it
    return found


def project_imports(path: Path, top_level_only: bool = False) -> set[tuple[Path, bool]]:
    """Project files ``path`` imports, each with whether only its top level runs (a parent package)."""
    out: set[tuple[Path, bool]] = set()
    for name in imports_of(path, top_level_only):
        parent_only = name.endswith(".")
        parts = name.rstrip(".").split(".")
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]))
            if f is not None:
                out.add((f, parent_only or i < len(parts)))
    return out


def closure(*roots: Path) -> set[Path]:
    """Files that run when ``roots`` run: imported modules, and the top level of their parent packages."""
    seen: set[tuple[Path, bool]] = set()
    todo = [(r, False) for r in roots]
    while todo:
        item = todo.pop()
        if item in seen or (item[1] and (item[0], False) in seen):
            continue
        seen.add(item)
        todo.extend(project_imports(*item))
    return {f for f, _ in seen}


def rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def library_files() -> list[Path]:
    return sorted(p for p in (REPO / "shrinkflow").rglob("*.py") if rel(p) not in LAUNCHERS)


@pytest.mark.parametrize("path", library_files(), ids=rel)
def test_the_library_imports_nothing_above_it(path):
    above = sorted(n.rstrip(".") for n in imports_of(path) if n.split(".")[0] in ABOVE_LIBRARY)
    assert not above, f"{rel(path)} imports {above}: the library may not (DESIGN.md, who may import whom)"


@pytest.mark.parametrize("path", sorted((REPO / "schemas").rglob("*.py")), ids=rel)
def test_schemas_import_only_schemas(path):
    ours = sorted(n.rstrip(".") for n in imports_of(path) if n.split(".")[0] in PACKAGES and n.split(".")[0] != "schemas")
    assert not ours, f"{rel(path)} imports {ours}: schemas/ is the lowest floor"


def test_no_import_circles_in_the_library():
    files = library_files()
    graph = {f: {g for g, _ in project_imports(f) if g in files} for f in files}
    # The package's own __init__ is not an edge of its submodules (Python imports it first anyway).
    graph = {f: {g for g in deps if not (g.name == "__init__.py" and f.is_relative_to(g.parent))} for f, deps in graph.items()}
    state: dict[Path, int] = {}
    stack: list[Path] = []

    def visit(f: Path) -> None:
        state[f] = 1
        stack.append(f)
        for g in sorted(graph[f]):
            if state.get(g) == 1:
                cycle = stack[stack.index(g):] + [g]
                pytest.fail("import circle: " + " → ".join(rel(c) for c in cycle))
            if g not in state:
                visit(g)
        stack.pop()
        state[f] = 2

    for f in files:
        if f not in state:
            visit(f)


def _declared(deps: list[str]) -> set[Path]:
    """Project .py files the deps cover: a file, or every .py file of a folder."""
    out: set[Path] = set()
    for d in deps:
        p = REPO / d
        if p.is_dir():
            out.update(p.rglob("*.py"))
        elif p.suffix == ".py":
            out.add(p)
    return out


def stage_code(stage: str) -> set[Path]:
    """The project files ``shrinkflow stage NAME`` runs: the dispatcher, the stage module, their imports."""
    return {f for f in closure(REPO / "tasks/run.py", REPO / "tasks" / f"{stage}.py") if rel(f) not in LAUNCHERS}


def test_each_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, st in stages.items():
        deps = [d for d in st["deps"] if not d.startswith("${")]
        code = stage_code(name)
        declared = _declared(deps)
        missing = sorted(rel(f) for f in code - declared)
        extra = sorted(rel(f) for f in declared - code)
        if missing:
            problems.append(f"{name}: dvc.yaml misses {missing}")
        if extra:
            problems.append(f"{name}: dvc.yaml lists code it does not import: {extra}")
    assert not problems, "\n".join(problems)


def test_the_closure_follows_function_level_and_from_imports(tmp_path):
    # The checker itself: `from pkg import module` and imports inside functions count.
    code = closure(REPO / "tasks/prune.py")
    assert REPO / "shrinkflow/sensitivity.py" in code  # `from shrinkflow import sensitivity as sens`
    assert REPO / "shrinkflow/loading.py" in code
    assert REPO / "flows/compress.py" not in code
