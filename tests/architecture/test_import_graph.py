"""The pipeline's stages import one way: core -> onnx/models/accuracy -> exporter -> calibration
-> quantization -> targets -> builder -> benchmark -> deploy -> api/cli. Every import counts, including
the ones inside functions, and no two modules import each other (directly or in a loop)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2] / "enginekit"
STAGES = {
    "core": 0, "onnx": 1, "models": 1, "accuracy": 1, "exporter": 2, "calibration": 3, "quantization": 4,
    "targets": 5, "builder": 6, "benchmark": 7, "deploy": 8, "api": 9, "cli": 9, "__main__": 9, "__init__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> int:
    parts = module.split(".")
    return STAGES["__init__"] if len(parts) == 1 else STAGES[parts[1]]


def imports_of(path: Path) -> set[str]:
    """Every enginekit module `path` imports, wherever the import statement is."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "enginekit"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "enginekit":
                continue
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_imports_a_later_stage():
    offenders = [f"{module} (stage {stage_of(module)}) imports {target} (stage {stage_of(target)})"
                 for module, targets in graph().items() for target in targets
                 if stage_of(target) > stage_of(module) and target != "enginekit"]
    assert not offenders, "\n".join(sorted(offenders))


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if target == "enginekit" or target in (p for p in path if False):
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)
