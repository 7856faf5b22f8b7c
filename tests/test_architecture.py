"""The house rules of docs/architecture.md, checked on the source: module imports form no cycle, no module imports a
private name of another package, and the ground floor (patterns, stats, io) imports nothing of sparsecraft's but
itself."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsecraft"
GROUND = {"sparsecraft.patterns", "sparsecraft.stats", "sparsecraft.io"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of the imports executed when the module loads (not those inside functions)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in tree.body:
        nodes = [node] + (list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [])
        for n in nodes:
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("sparsecraft") and n.level == 0:
                out.append((n.module, [a.name for a in n.names]))
            elif isinstance(n, ast.Import):
                out += [(a.name, []) for a in n.names if a.name.startswith("sparsecraft")]
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names in top_level_imports(path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in modules and cand != name:
                    edges[name].add(cand)
                    break
    return edges


def test_module_imports_form_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open" and not n.startswith(m + "."):  # a package importing its own parts is fine
                cycles.append(stack[stack.index(n):] + [m, n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles[:5]


def test_no_private_names_across_packages():
    bad = []
    for path in SRC.rglob("*.py"):
        here = module_name(path).split(".")[:2]
        for target, names in top_level_imports(path):
            if target.split(".")[:2] != here:
                bad += [f"{module_name(path)} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_the_ground_floor_imports_nothing_above_it():
    for name in GROUND:
        path = SRC / f"{name.split('.')[1]}.py"
        above = [t for t, _ in top_level_imports(path) if t not in GROUND]
        assert not above, (name, above)
