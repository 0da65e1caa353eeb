"""The runtime import graph of hmmsim goes one way (DESIGN §1), checked here.

import-linter's graph builder (grimp) walks a package's directory tree, so in
an editable install it sees only ``core/`` and misses ``hmmsim.drivers`` and
``hmmsim.bench``, which setuptools maps from ``drivers/`` and ``bench/``. This
module builds the graph itself with :mod:`ast` over every module of the three
source roots, including imports made inside functions (they run too, just
later), and leaves out imports under ``if TYPE_CHECKING:`` (they never run).

It checks three rules and reports each offending import with its file and
line, and each cycle as the chain of imports that closes it:

- layers: a module imports only from its own layer or the layers below it
  (the one documented exception is ``Machine.probe`` importing
  ``hmmsim.plugins``);
- drivers are independent of each other;
- no import cycle between modules.

Run it as a script (``python tests/testing/test_layering.py``) to print the
layers, the violations and the cycles; CI runs it that way as well as through
pytest.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Import name -> source folder, as ``[tool.setuptools] package-dir`` maps them.
ROOTS: dict[str, Path] = {
    "hmmsim": REPO / "core",
    "hmmsim.drivers": REPO / "drivers",
    "hmmsim.bench": REPO / "bench",
}

#: Layers from low to high: a module may import its own layer and the ones
#: below. Each layer lists module-name prefixes; the longest prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors/trace", ("hmmsim.errors", "hmmsim.trace")),
    ("sched", ("hmmsim.sched",)),
    ("notifier", ("hmmsim.notifier",)),
    # hmmsim.memremap is the face of hmmsim.mm.memremap.
    ("mm", ("hmmsim.mm", "hmmsim.memremap")),
    # The DMA API sits under PCI: every PCI function owns a DmaDevice behind its
    # IOMMU domain (as struct pci_dev embeds the struct device the DMA API
    # takes), and dma.py needs nothing from pci.py or the machine at run time.
    ("dma", ("hmmsim.iommu", "hmmsim.dma_mapping")),
    ("pci", ("hmmsim.pci",)),
    ("machine", ("hmmsim.machine",)),
    ("hmm/migrate", ("hmmsim.hmm", "hmmsim.hmm_legacy", "hmmsim.migrate")),
    # hmmsim.dma is the face drivers import: the DMA API, IOMMU domains and the
    # HMM DMA helpers of hmmsim.hmm, re-exported (as include/linux/hmm-dma.h).
    ("dma face", ("hmmsim.dma",)),
    ("gup", ("hmmsim.gup",)),
    ("exclusive", ("hmmsim.exclusive",)),
    ("explore", ("hmmsim.explore",)),
    # The package face re-exports the model and the driver contract.
    ("driver/hookspecs", ("hmmsim.driver", "hmmsim.hookspecs", "hmmsim")),
    ("plugins", ("hmmsim.plugins",)),
    # The new-driver template is a driver; the bug zoo mutates it like one.
    ("drivers", ("hmmsim.drivers", "hmmsim.newdriver")),
    ("testing", ("hmmsim.testing",)),
    ("cli", ("hmmsim.cli", "hmmsim.__main__", "hmmsim.demo", "hmmsim.bench")),
]

#: Upward imports the design allows, as (importer prefix, imported prefix, why).
EXCEPTIONS: list[tuple[str, str, str]] = [
    ("hmmsim.machine", "hmmsim.plugins", "Machine.probe finds drivers through the plugin manager"),
]


#: Layer violations and cycles being removed; these lists only shrink.
KNOWN_VIOLATIONS: frozenset[str] = frozenset()
KNOWN_CYCLES: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Edge:
    """One import statement: ``importer`` imports ``target`` at ``path:line``."""

    importer: str
    target: str
    path: Path
    line: int

    def where(self) -> str:
        """Return ``path:line`` relative to the repository."""
        return f"{self.path.relative_to(REPO)}:{self.line}"


def discover() -> dict[str, tuple[Path, bool]]:
    """Map every module name to its file and whether it is a package."""
    modules: dict[str, tuple[Path, bool]] = {}
    for root_name, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            name = ".".join([root_name, *parts])
            # A folder mapped to its own root (drivers/ under core/) wins.
            if name in modules and modules[name][0] != path:
                continue
            modules[name] = (path, is_pkg)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Yield every import statement that can run, skipping TYPE_CHECKING blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(
    name: str, path: Path, is_pkg: bool, modules: dict[str, tuple[Path, bool]]
) -> list[Edge]:
    """Return the hmmsim modules that ``name`` imports at run time."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_pkg else name.rpartition(".")[0]
    edges: list[Edge] = []
    seen: set[Edge] = set()

    def add(target: str, line: int) -> None:
        # Resolve to the longest existing module prefix.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            edge = Edge(name, target, path, line)
            if edge not in seen:
                seen.add(edge)
                edges.append(edge)

    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hmmsim":
                    add(alias.name, node.lineno)
            continue
        if node.level:
            base_parts = package.split(".")
            if node.level > 1:
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts)
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        if source.split(".")[0] != "hmmsim":
            continue
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            add(sub if sub in modules else source, node.lineno)
    return edges


@functools.cache
def build_graph() -> tuple[dict[str, tuple[Path, bool]], list[Edge]]:
    """Return every module and every runtime import edge between hmmsim modules."""
    modules = discover()
    edges: list[Edge] = []
    for name, (path, is_pkg) in modules.items():
        edges.extend(imports_of(name, path, is_pkg, modules))
    return modules, edges


def layer_of(module: str) -> int:
    """Return the index in :data:`LAYERS` of the layer ``module`` belongs to."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise LookupError(f"module {module} is in no layer; add it to LAYERS")
    return best


def _excepted(edge: Edge) -> bool:
    return any(
        (edge.importer == a or edge.importer.startswith(a + "."))
        and (edge.target == b or edge.target.startswith(b + "."))
        for a, b, _ in EXCEPTIONS
    )


def layer_violations(edges: list[Edge]) -> list[str]:
    """Return one line per import that reaches up a layer."""
    out = []
    for e in edges:
        lo, hi = layer_of(e.importer), layer_of(e.target)
        if hi > lo and not _excepted(e):
            out.append(
                f"{e.where()}: {e.importer} ({LAYERS[lo][0]}) imports {e.target} ({LAYERS[hi][0]})"
            )
    return out


def _driver_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["hmmsim", "drivers"] and len(parts) > 2:
        return parts[2]
    return None


def driver_crossings(edges: list[Edge]) -> list[str]:
    """Return one line per import from one driver package into another."""
    out = []
    for e in edges:
        a, b = _driver_of(e.importer), _driver_of(e.target)
        if a and b and a != b:
            out.append(f"{e.where()}: driver {a} imports driver {b} ({e.target})")
    return out


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """Return one closing chain of imports for each strongly connected component."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, {}).setdefault(e.target, e)
    # Tarjan's algorithm, iterative.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))
    chains = []
    for comp in sorted(sccs):
        members = set(comp)
        start = comp[0]
        # Shortest path from start back to start inside the component (BFS).
        prev: dict[str, Edge] = {}
        frontier = [start]
        seen = {start}
        found: Edge | None = None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child, edge in sorted(graph.get(node, {}).items()):
                    if child == start:
                        found = edge
                        break
                    if child in members and child not in seen:
                        seen.add(child)
                        prev[child] = edge
                        nxt.append(child)
                if found:
                    break
            frontier = nxt
        assert found is not None
        chain = [found]
        while chain[0].importer != start:
            chain.insert(0, prev[chain[0].importer])
        chains.append(chain)
    return chains


def unit_of(module: str) -> str:
    """Return the package-level unit of ``module``: ``hmmsim.X`` or one driver."""
    parts = module.split(".")
    if parts[:2] == ["hmmsim", "drivers"]:
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def unit_edges(edges: list[Edge]) -> list[Edge]:
    """Collapse ``edges`` to edges between units (``hmmsim.mm``, ``hmmsim.sched`` ...).

    Importing ``hmmsim.mm.physmem`` runs ``hmmsim.mm`` first, so two units that
    import each other form a cycle at package level even when no two modules do.
    """
    out = []
    for e in edges:
        a, b = unit_of(e.importer), unit_of(e.target)
        if a != b:
            out.append(Edge(a, b, e.path, e.line))
    return out


def format_chain(chain: list[Edge]) -> str:
    """Render a cycle as ``a -> b (file:line) -> ... -> a``."""
    return " -> ".join([chain[0].importer] + [f"{e.target} ({e.where()})" for e in chain])


def test_every_module_is_in_a_layer() -> None:
    modules, _ = build_graph()
    for name in modules:
        layer_of(name)


def test_drivers_and_bench_are_in_the_graph() -> None:
    modules, edges = build_graph()
    assert "hmmsim.drivers.dmirror" in modules
    assert "hmmsim.bench.conftest" in modules
    assert any(e.importer.startswith("hmmsim.drivers.") for e in edges)


def test_function_local_imports_count() -> None:
    _, edges = build_graph()
    assert any(e.importer == "hmmsim.machine" and e.target == "hmmsim.plugins" for e in edges)


def test_imports_go_down_the_layers() -> None:
    _, edges = build_graph()
    assert set(layer_violations(edges)) - KNOWN_VIOLATIONS == set()
    assert KNOWN_VIOLATIONS - set(layer_violations(edges)) == set(), "fixed: drop from list"


def test_drivers_are_independent_of_each_other() -> None:
    _, edges = build_graph()
    assert driver_crossings(edges) == []


def _all_cycles() -> set[str]:
    _, edges = build_graph()
    return {format_chain(c) for c in cycles(edges)} | {
        format_chain(c) for c in cycles(unit_edges(edges))
    }


def test_no_runtime_import_cycle() -> None:
    assert _all_cycles() - KNOWN_CYCLES == set()


def test_known_cycles_list_only_shrinks() -> None:
    assert KNOWN_CYCLES - _all_cycles() == set()


def main() -> int:
    """Print the layers, then every violation and cycle; exit 1 on a new one."""
    modules, edges = build_graph()
    for index, (layer, _) in enumerate(LAYERS):
        members = sorted(m for m in modules if layer_of(m) == index)
        print(f"{index:2} {layer}: {len(members)} modules")
    problems = layer_violations(edges) + driver_crossings(edges)
    problems += ["cycle: " + format_chain(c) for c in cycles(edges)]
    problems += ["package cycle: " + format_chain(c) for c in cycles(unit_edges(edges))]
    known = KNOWN_VIOLATIONS | {
        f"{kind}cycle: {c}" for c in KNOWN_CYCLES for kind in ("", "package ")
    }
    new = [line for line in problems if line not in known]
    for line in problems:
        print(("known: " if line not in new else "") + line)
    print(f"{len(modules)} modules, {len(edges)} imports, {len(new)} new problems")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
