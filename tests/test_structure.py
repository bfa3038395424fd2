"""The repo's own imports point one way: no module imports a module that imports it back, directly or
through others, counting imports inside functions too (STYLE.md, "Dependencies point down")."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_graph() -> dict[str, set[str]]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def reachable(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_scripts_dont_import_each_other_and_models_dont_import_scripts():
    graph = import_graph()
    assert "training_vqgan" not in graph["training_transformer"]
    for model in ("vqgan", "encoder", "decoder", "codebook", "discriminator", "transformer", "mingpt", "lpips"):
        assert not {m for m in graph[model] if m.startswith(("training_", "sample_", "evaluate", "benchmark"))}


def test_checkpoint_reading_imports_no_model():
    graph = import_graph()
    models = {"vqgan", "encoder", "decoder", "codebook", "discriminator", "transformer", "mingpt", "lpips"}
    assert not reachable(graph, "checkpoints") & models
