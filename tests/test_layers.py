"""The import graph of llmstack/ has no cycle and follows the layer order: a lower layer never
imports an upper one. Function-local imports count as much as module-level ones, since a cycle
dodged by a late import is still a cycle.

Layers, low to high: errors/config -> kernels, checkpoint, data -> model -> hf, lora, quant, prune
-> pretrained (loads any model folder) -> parallel/engines -> train, eval, generate, distill, export,
serve -> cli. Imports within one layer are allowed (lora reads hf's names; quant writes hf folders);
the cycle check keeps those acyclic too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "llmstack"

# module (or package prefix) -> layer; a module takes the layer of its longest named prefix
LAYERS = {
    "llmstack": 0, "llmstack.errors": 0, "llmstack.jsonio": 0, "llmstack.versions": 0, "llmstack.config": 0,
    "llmstack.kernels": 1, "llmstack.checkpoint": 1, "llmstack.outputs": 1, "llmstack.data": 1,
    "llmstack.runlock": 1, "llmstack.perf": 1, "llmstack.profiling": 1, "llmstack.tracking": 1,
    "llmstack.model": 2, "llmstack.folders": 2, "llmstack.calibration": 2,
    "llmstack.hf": 3, "llmstack.lora": 3, "llmstack.quant": 3, "llmstack.prune": 3,
    "llmstack.pretrained": 4,
    "llmstack.parallel": 5, "llmstack.engine": 5,
    "llmstack.train": 6, "llmstack.eval": 6, "llmstack.generate": 6, "llmstack.distill": 6,
    "llmstack.export": 6, "llmstack.serve": 6,
    "llmstack.cli": 7, "llmstack.__main__": 7,
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_edges(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported llmstack module: line of the first such import}, every import statement
    in the file (module level, in functions, under if/try). `from P import name` points at the
    submodule P.name when there is one, else at P."""
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb level - 1 packages from this module's package
                    pkg = package
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import llmstack.x.y` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != mod and target.startswith("llmstack"):
                    edges[mod].setdefault(target, node.lineno)
    return edges


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one module."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan; the graph has ~70 nodes, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:  # a shortest way back to the start, inside the component
        start = min(comp)
        paths, seen = {start: [start]}, {start}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w == start:
                    cycles.append(paths[v] + [start])
                    queue = []
                    break
                if w in comp and w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def layer_of(mod: str) -> int | None:
    """The layer of the longest named prefix; the bare package name covers only llmstack/__init__.py."""
    if mod == "llmstack":
        return LAYERS[mod]
    while "." in mod:
        if mod in LAYERS:
            return LAYERS[mod]
        mod = mod.rpartition(".")[0]
    return None


def upward_imports(edges: dict[str, dict[str, int]], mods: dict[str, Path]) -> list[str]:
    bad = []
    for mod, targets in sorted(edges.items()):
        for target, line in sorted(targets.items()):
            a, b = layer_of(mod), layer_of(target)
            if a is not None and b is not None and b > a:
                bad.append(f"{mods[mod].relative_to(ROOT.parent)}:{line}: {mod} (layer {a}) imports {target} (layer {b})")
    return bad


def test_import_graph_has_no_cycle():
    mods = module_files()
    cycles = find_cycles(import_edges(mods))
    assert not cycles, "import cycles in llmstack/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_lower_layers_never_import_upper_ones():
    mods = module_files()
    bad = upward_imports(import_edges(mods), mods)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_every_layer_names_a_module_that_exists():
    # a renamed module must not leave its layer entry checking nothing
    mods = module_files()
    assert not [name for name in LAYERS if name not in mods]


def test_the_walk_sees_function_local_and_relative_imports(tmp_path):
    """The checks above are only as good as the walk: a late import inside a function and a
    relative import both become edges, and the cycle they close is reported as a path."""
    pkg = tmp_path / "llmstack"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from llmstack.high import g\n    return g\n")
    (pkg / "high.py").write_text("from llmstack.sub import leaf\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("from .. import low\n")
    mods = module_files(pkg)
    edges = import_edges(mods)
    assert edges["llmstack.low"] == {"llmstack.high": 2}
    assert edges["llmstack.high"] == {"llmstack.sub.leaf": 1}
    assert edges["llmstack.sub.leaf"] == {"llmstack.low": 1}
    assert find_cycles(edges) == [["llmstack.high", "llmstack.sub.leaf", "llmstack.low", "llmstack.high"]]
