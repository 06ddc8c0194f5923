"""Imports go one way between the layers, lowest first: pipeline <- training <- serving <- cluster <- lossaverse.

A module may import its own layer and the layers below it, never one above, not even inside a
function; and no module imports itself back through others (no import cycles, lazy imports
included). The imports are read from the source with `ast`, nothing is imported."""

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["pipeline", "training", "serving", "cluster", "lossaverse"]  # lowest first; lossaverse: the Python API


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the layers' packages."""
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _project_module(dotted: str) -> str | None:
    """The project module `dotted` names (a name inside a module counts as that module), or None."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports_of(name: str) -> set[str]:
    """The project modules that module `name` imports, anywhere in its source (module level,
    inside functions, under `if`/`try`)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pipeline import synthetic` imports the module pipeline.synthetic
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in map(_project_module, found) if m is not None and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_layer_has_modules():
    assert {m.split(".")[0] for m in MODULES} == set(LAYERS)


def test_function_local_imports_are_seen():
    """The parse finds imports inside functions: pipeline.mark calls the judge lazily."""
    assert "pipeline.judge" in GRAPH["pipeline.mark"]
    assert "serving.model" in GRAPH["cluster.cli"]


def test_no_import_goes_up_a_layer():
    upward = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m))
    assert not upward, (
        f"layers are {' <- '.join(LAYERS)} (lowest first); a module imports only its own layer and those "
        "below it. Move the shared code down, or pass it in from the caller: " + "; ".join(upward)
    )


def test_no_import_cycles():
    try:
        tuple(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
