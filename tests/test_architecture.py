"""The package's import graph: no cycles (function-level imports included) and the layers of docs/design.md."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "muonq_hf"

# docs/design.md, "Layers": a module may import modules of its own layer or of the layers before it
LAYERS = [
    {"kernels", "precision"},
    {"codecs", "lowrank", "orthogonalize", "matrices", "options", "keyed", "weights"},
    {"state", "banks"},
    {"momentum", "adamw"},
    {"checkpoint", "memory"},
    {"backends", "backends.common", "backends.owner", "backends.fsdp2"},
    {"graphs"},
    {"optimizer"},
    {"deepspeed", "deepspeed_checkpoint", "grouping", "plan", "hf", "run"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every package module imported anywhere in ``path`` (module level, functions, TYPE_CHECKING blocks)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "muonq_hf":
                base = []
            else:
                continue
            module = [*base, *(node.module.split(".") if node.module else [])]
            if module and module[0] == "muonq_hf":
                module = module[1:]
            for alias in node.names:  # `from . import x` imports the module x
                candidate = ".".join([*module, alias.name])
                out.add(candidate if (PACKAGE / f"{candidate.replace('.', '/')}.py").exists() else ".".join(module))
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("muonq_hf.")}
    return {m for m in out if m} - {name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if module_name(p)}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_modules_import_only_their_layer_and_the_layers_before():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    edges = graph()
    unplaced = sorted(set(edges) - set(layer_of))
    assert not unplaced, f"modules missing from docs/design.md's layers: {unplaced}"
    wrong = [
        f"{m} (layer {layer_of[m]}) imports {n} (layer {layer_of[n]})"
        for m, targets in edges.items()
        for n in targets
        if layer_of[n] > layer_of[m]
    ]
    assert not wrong, wrong


def test_the_graph_is_read():  # negative control: the parser sees the imports the layering test relies on
    edges = graph()
    assert "backends" in edges["optimizer"] and "state" in edges["momentum"]
    assert "common" not in edges["backends.owner"] and "backends.common" in edges["backends.owner"]
    assert "optimizer" in edges["deepspeed"] and "backends.common" in edges["deepspeed"]
