"""No import cycles between modules of the engine or the operator.

import-linter's ``acyclic_siblings`` contract compares packages (it would flag the intended core <-> kv seam, where
core drives a ``kv.KVBackend`` and kv's interfaces name core's ``StepPlan``) and never sees a package's
``__init__`` importing its own children. A cycle between modules is what actually bites: import order starts to
matter and neither module can be understood alone. grimp counts ``TYPE_CHECKING`` and function-level imports too,
so a cycle hidden behind either is still a cycle.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("pie_engine", "pie_operator")


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (a deep import chain must not hit the recursion limit); components of one
    module are dropped, since grimp never records a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def import_edges() -> dict[str, set[str]]:
    graph = grimp.build_graph(*PACKAGES)
    ours = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    return {m: graph.find_modules_directly_imported_by(m) & ours for m in ours}


def describe(component: list[str], edges: dict[str, set[str]]) -> str:
    members = set(component)
    links = [f"    {a} -> {b}" for a in component for b in sorted(edges[a] & members)]
    return "  cycle among " + ", ".join(component) + ":\n" + "\n".join(links)


def test_scc_finder_reports_cycles_and_only_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert strongly_connected_components(edges) == [["a", "b", "c"], ["d", "e"]]
    assert strongly_connected_components({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    edges = import_edges()
    cycles = strongly_connected_components(edges)
    if cycles:
        pytest.fail("import cycles (break each by moving the shared piece into its own module):\n"
                    + "\n".join(describe(c, edges) for c in cycles), pytrace=False)
