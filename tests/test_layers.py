"""The package's layers point one way, and its import graph has no cycle.

Every ``import edgeguard...`` / ``from edgeguard... import`` in every module is read with ``ast`` -- top-level and
function-local alike, ``if TYPE_CHECKING:`` blocks excepted -- so a local import cannot hide a cycle or an upward
dependency: with no cycle in the full graph, no local import exists to break one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgeguard"

# Lowest first.  A module may import from its own layer or a lower one.  Siblings of one layer may import each other
# (export uses protect's guard checks, quantize uses export) as long as the module graph stays acyclic.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("edgeguard", "edgeguard.errors", "edgeguard.progress", "edgeguard.fileio", "edgeguard.registry",
     "edgeguard.config", "edgeguard.stats", "edgeguard.results"),
    ("edgeguard.data", "edgeguard.models"),
    ("edgeguard.training",),
    ("edgeguard.bundle", "edgeguard.defenses", "edgeguard.importing"),
    ("edgeguard.runtime",),
    ("edgeguard.protect", "edgeguard.quantize", "edgeguard.export", "edgeguard.serve"),
    ("edgeguard.attacks", "edgeguard.evaluate"),
    ("edgeguard.verbs", "edgeguard.testing"),
    ("edgeguard.pipeline", "edgeguard.grid"),
    ("edgeguard.api",),  # the front door: re-exports every verb
    ("edgeguard.cli", "edgeguard.__main__"),
)


def module_names() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported edgeguard module, line, function-local) for every edgeguard import of ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            is_local = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                # ``from edgeguard.x import y`` depends on edgeguard.x.y when y is a module, else on edgeguard.x
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in child.names]
            for t in targets:
                if t == "edgeguard" or t.startswith("edgeguard."):
                    resolved = _resolve(t, mods)
                    if resolved and resolved != module:
                        found.append((resolved, child.lineno, is_local))
            visit(child, is_local)

    visit(tree, False)
    return found


def find_layer(module: str) -> int | None:
    """Index of the layer whose longest matching prefix covers ``module``, or None."""
    best = (None, -1)
    for i, group in enumerate(LAYERS):
        for prefix in group:
            covers = module == prefix or (prefix != "edgeguard" and module.startswith(prefix + "."))  # the root: itself only
            if covers and len(prefix) > best[1]:
                best = (i, len(prefix))
    return best[0]


def layer_of(module: str) -> int:
    layer = find_layer(module)
    if layer is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return layer


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    mods = module_names()
    return mods, {m: imports_of(m, p, mods) for m, p in mods.items()}


def cycles(edges: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted({t for t, _, _ in edges[root]})))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted({t for t, _, _ in edges.get(w, [])}))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_module_is_in_a_layer():
    mods, _ = graph()
    unplaced = sorted(m for m in mods if find_layer(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    assert find_layer("edgeguard_extra.x") is None and find_layer("edgeguard.apix") is None  # prefixes match whole names


def test_no_import_points_up():
    _, edges = graph()
    upward = [f"{m}:{line} imports {t} ({'inside a function' if local else 'at module level'}): layer "
              f"{layer_of(m)} -> {layer_of(t)}"
              for m, es in sorted(edges.items()) for t, line, local in es if layer_of(t) > layer_of(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_import_graph_has_no_cycle():
    _, edges = graph()
    found = cycles(edges)
    assert not found, "import cycles (function-local imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_function_local_imports_outside_the_cli():
    """Library modules import edgeguard modules at the top: nothing is deferred to dodge a cycle.  The CLI alone
    imports the front door inside its commands (its choice lists, read from the registries when the commands are
    built, load torch anyway: ``edgeguard --help`` takes about 1.6 s here)."""
    _, edges = graph()
    local = [f"{m}:{line} imports {t}" for m, es in sorted(edges.items()) for t, line, is_local in es
             if is_local and not (m == "edgeguard.cli" or m.startswith("edgeguard.cli."))]
    assert not local, "function-local imports of edgeguard modules:\n" + "\n".join(local)


def test_the_cli_goes_through_the_front_door():
    """Every command is option parsing, one ``edgeguard.api`` call and printing: the CLI imports nothing else of
    edgeguard but its errors (and itself)."""
    _, edges = graph()
    allowed = ("edgeguard.api", "edgeguard.errors")
    other = [f"{m}:{line} imports {t}" for m, es in sorted(edges.items()) if m == "edgeguard.cli" or m.startswith("edgeguard.cli.")
             for t, line, _ in es if t not in allowed and not (t == "edgeguard.cli" or t.startswith("edgeguard.cli."))]
    assert not other, "CLI imports past the front door:\n" + "\n".join(other)


def test_the_checks_can_fail(tmp_path):
    """The walker sees function-local and relative imports, and the cycle finder finds a planted cycle."""
    pkg = tmp_path / "edgeguard"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from edgeguard.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nimport edgeguard\n")
    mods = {"edgeguard": pkg / "__init__.py", "edgeguard.sub": pkg / "sub" / "__init__.py",
            "edgeguard.sub.a": pkg / "sub" / "a.py", "edgeguard.sub.b": pkg / "sub" / "b.py"}
    edges = {m: imports_of(m, p, mods) for m, p in mods.items()}
    assert ("edgeguard.sub.b", 2, True) in edges["edgeguard.sub.a"]
    assert ("edgeguard.sub.a", 1, False) in edges["edgeguard.sub.b"]
    assert cycles(edges) == [["edgeguard.sub.a", "edgeguard.sub.b"]]
    assert layer_of("edgeguard.cli.train") > layer_of("edgeguard.api") > layer_of("edgeguard.evaluate.golden")


@pytest.mark.parametrize("name", ["api", "verbs", "bundle", "runtime", "protect", "data"])
def test_layers_hold_real_modules(name):
    """Each layer name used above is a real module or package (a typo would silently exempt code)."""
    mods = module_names()
    assert f"edgeguard.{name}" in mods
    for group in LAYERS:
        for prefix in group:
            assert prefix in mods or any(m.startswith(prefix + ".") for m in mods), prefix
