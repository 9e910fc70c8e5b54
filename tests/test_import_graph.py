"""The parallel package's modules import each other without a cycle (counting imports inside functions
too: a lazy import that closes a circle still ties the modules together and breaks at the first eager
use). The layering this keeps: mesh / tensor_parallel / state_dict are leaves; parallelize applies the
parallelisms; zero, pipeline and data_parallel build engines on top."""
import ast
from pathlib import Path

import shardwise

ROOT = Path(shardwise.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / package.split(".", 1)[1].replace(".", "/")).rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for name in [target] + [f"{target}.{a.name}" for a in node.names]:
                if name in files and name != mod:
                    graph[mod].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_parallel_package_has_no_import_cycle():
    g = _graph("shardwise.parallel")
    assert "shardwise.parallel.state_dict" in g and g["shardwise.parallel.expert_parallel"], g
    cycle = _cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
