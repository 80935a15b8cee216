"""The code base's shape, checked: no import cycles, short functions, stage kinds known only in alignctl/stages/
(the plan-time package's imports: test_config_imports.py).
The plan-time package has stricter rules of its own: no cycle through it, resolvers of at most 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "alignctl"
MAX_FUNCTION_LINES = 80
MAX_RESOLVER_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or
                                         isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _executed(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations never run)."""
    for child in ast.iter_child_nodes(tree):
        if _type_checking(child):
            continue
        yield child
        yield from _executed(child)


def _imports(name: str, path: Path) -> set[str]:
    """alignctl modules ``name`` imports anywhere in its body (module level and inside functions; not the imports
    for type annotations under ``if TYPE_CHECKING:``, which never run)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _executed(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("alignctl"):
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_module_or_function_level():
    graph = {}
    for name, path in MODULES.items():
        # a package's own submodules imported by it are not a cycle with the submodule importing the package's names
        graph[name] = {m for m in _imports(name, path) if not (path.name == "__init__.py" and m.startswith(name + "."))}
    assert _cycles(graph) == []


def test_no_function_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []


def _kind_names() -> set[str]:
    return {p.stem for p in (PKG / "stages").glob("*.py") if p.stem != "__init__"}


def test_no_stage_kind_name_outside_the_stages_package():
    """A kind is known by name only in alignctl/stages/: everything else asks the registry (StageKind fields)."""
    assert _kind_literals(n for n in MODULES if not n.startswith("alignctl.stages")) == []


def _kind_literals(names) -> list[str]:
    kinds = _kind_names()
    # names that are also other words of the vocabulary (a data kind, a link, a CLI command): flagged only where they
    # are compared with a stage's kind or used to look one up
    shared = {"sft", "reward", "generate", "critique"}  # a critique is also what a critic writes
    found = []
    for name in names:
        path = MODULES[name]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in kinds - shared:
                found.append(f"{name}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                consts = [s.value for s in sides if isinstance(s, ast.Constant) and s.value in shared]
                consts += [e.value for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set))
                           for e in s.elts if isinstance(e, ast.Constant) and e.value in shared]
                if consts and any(_names_a_kind(s) for s in sides):
                    found.append(f"{name}:{node.lineno} compares a kind with {consts}")
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "STAGES" \
                    and isinstance(node.slice, ast.Constant):
                found.append(f"{name}:{node.lineno} STAGES[{node.slice.value!r}]")
    return found


def _names_a_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("kind", "trainer")
    if isinstance(node, ast.Attribute):
        return node.attr in ("kind", "trainer") or (node.attr == "name" and _names_a_kind(node.value))
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value in ("kind", "trainer")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value in ("kind", "trainer")
    return False


# -- the plan-time package (alignctl/config/) ------------------------------------------------------------------------
CONFIG = sorted(m for m in MODULES if m.startswith("alignctl.config"))


def test_no_import_cycle_runs_through_the_config_package():
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m in _imports(name, path) if not (path.name == "__init__.py" and m.startswith(name + "."))}
    assert [c for c in _cycles(graph) if any(m in CONFIG for m in c)] == []


def test_config_functions_are_at_most_60_lines():
    """The resolvers (and everything else of alignctl/config/) stay short: spec.resolve was 193 lines."""
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name in CONFIG
            for node in ast.walk(ast.parse(MODULES[name].read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_RESOLVER_LINES]
    assert long == []


def test_no_stage_kind_name_in_the_config_package():
    """Kind-specific rules (ranges, checks, rounds, generated data, sharding) are declared by the kinds."""
    assert CONFIG and _kind_literals(CONFIG) == []


# -- the typed spec (alignctl/config/types.py) -----------------------------------------------------------------------
def test_the_specs_are_not_mappings():
    """The migration shim is gone: a spec is read by attribute (``spec.kind``, ``spec.links["ref"].path``,
    ``spec.data.path``), never by an old dict key (``spec["init_path"]``, ``spec.get("reward_path")``, ``{**spec}``)."""
    from collections.abc import Mapping

    from alignctl.config import types

    specs = [c for c in vars(types).values() if isinstance(c, type) and issubclass(c, types.Spec)]
    assert {c.__name__ for c in specs} >= {"RunSpec", "StageSpec", "ModelSpec", "LinkSpec", "DataSpec", "DataCheck",
                                           "EvalSettings"}
    dict_api = ("__getitem__", "get", "keys", "items", "values", "__iter__", "__contains__", "__len__")
    assert [f"{c.__name__}.{a}" for c in specs for a in dict_api if hasattr(c, a)] == []
    assert not [c.__name__ for c in specs if issubclass(c, Mapping)]
    assert not hasattr(types.StageSpec, "__getitem__") and not hasattr(types.StageSpec, "from_legacy")
