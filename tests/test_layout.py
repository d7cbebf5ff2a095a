"""The package's layout: no import cycle among modules, so any module can be imported first and a newcomer can read
the tree from the bottom up."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _graph() -> dict[str, set[str]]:
    """Module -> the headalloc modules it imports at module level (imports inside functions run late and are
    allowed to point up). A package's __init__ re-exporting its submodules is a module like any other."""
    def name(p: Path) -> str:
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name(p): p for p in (SRC / "headalloc").rglob("*.py")}
    graph = {}
    for m, p in mods.items():
        deps = set()
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("headalloc"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("headalloc")}
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            # a submodule reaching its own package's __init__ (which imports it) is Python's normal package import
            if m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": {"p"}}) is None


def test_no_module_level_import_cycle():
    graph = _graph()
    assert "headalloc.compression.planning.heads" in graph and len(graph) > 50
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
