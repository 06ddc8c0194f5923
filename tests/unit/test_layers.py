"""Imports go one way between the layers, lowest first: pipeline <- training <- serving <- cluster <- lossaverse.

Every layer imports as `lossaverse.<layer>` (`lossaverse` itself is the Python API): the stage folders
at the top of the repository install under that one name, so no import may name them bare.

A module may import its own layer and the layers below it, never one above, not even inside a
function; and no module imports itself back through others (no import cycles, lazy imports
included). The imports are read from the source with `ast`, nothing is imported.

Inside the lowest layer, pipeline/ is split by concern into subpackages (data, sources, models, generation,
marker, report, bench) plus the module pipeline/config.py; each may import only itself and the parts
DEPENDS declares for it, so the pipeline's own picture (data at the bottom, bench and config on top) holds."""

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["pipeline", "training", "serving", "cluster", "lossaverse"]  # lowest first; lossaverse: the Python API


STAGE_FOLDERS = LAYERS[:-1]  # top-level folders, installed as lossaverse.<folder>


def _modules() -> dict[str, Path]:
    """Dotted (installed) module name -> file, for every module of the layers' packages."""
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join(("lossaverse", *parts) if layer in STAGE_FOLDERS else parts)] = path
    return out


MODULES = _modules()


def _project_module(dotted: str) -> str | None:
    """The project module `dotted` names (a name inside a module counts as that module), or None."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imported_names(name: str) -> set[str]:
    """Every dotted name module `name` imports, anywhere in its source (module level, inside
    functions, under `if`/`try`), relative imports made absolute."""
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
            # `from lossaverse.pipeline.data import synthetic` imports the module lossaverse.pipeline.data.synthetic
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return found


def imports_of(name: str) -> set[str]:
    """The project modules that module `name` imports."""
    return {m for m in map(_project_module, imported_names(name)) if m is not None and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_name(module: str) -> str:
    """lossaverse.pipeline.marker.mark -> pipeline; lossaverse, lossaverse.__main__ -> lossaverse."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGE_FOLDERS else "lossaverse"


def layer(module: str) -> int:
    return LAYERS.index(layer_name(module))


def test_every_layer_has_modules():
    assert {layer_name(m) for m in MODULES} == set(LAYERS)
    assert all(m == "lossaverse" or m.startswith("lossaverse.") for m in MODULES)


def test_no_import_names_a_stage_folder_bare():
    """`from pipeline.marker.mark import ...` would only work from a checkout; installed, the one name is lossaverse."""
    bare = sorted(f"{m} imports {n}" for m in MODULES for n in imported_names(m) if n.split(".")[0] in STAGE_FOLDERS)
    assert not bare, "import the stages as lossaverse.<layer>: " + "; ".join(bare)


def test_function_local_imports_are_seen():
    """The parse finds imports inside functions: lossaverse.pipeline.marker.mark calls the judge lazily."""
    assert "lossaverse.pipeline.marker.judge" in GRAPH["lossaverse.pipeline.marker.mark"]
    assert "lossaverse.serving.model" in GRAPH["lossaverse.cluster.cli"]


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


def private_uses(name: str) -> set[str]:
    """`_name`s module `name` takes from another project module: `from M import _x`, or `M._x` after `import M`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name: a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module in MODULES and node.module != name:
            found |= {f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")}
            aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            module = aliases.get(ast.unparse(node.value))
            if module is not None and module != name:
                found.add(f"{module}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    """A name used from another module is part of that module's interface: make it public (no leading underscore)."""
    used = sorted(f"{m} uses {n}" for m in MODULES for n in private_uses(m))
    assert not used, "rename these to public names (and give them a docstring): " + "; ".join(used)


def test_no_test_imports_a_stage_folder_bare():
    """From the repository root `import pipeline` would still work, and load a second copy of each module
    beside lossaverse.pipeline (two registries, two config classes): the tests import the installed name."""
    bare = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            bare += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in STAGE_FOLDERS]
    assert not bare, "import the stages as lossaverse.<layer>: " + "; ".join(bare)


# --- Inside pipeline/: its subpackages and pipeline/config.py ("config"), each with the parts it may import.
PIPELINE = "lossaverse.pipeline"
DEPENDS = {
    "data": set(),
    "models": {"data"},
    "generation": {"data"},
    "marker": {"data", "generation", "models"},  # the judge runs its model through generation's processors
    "sources": {"data", "marker"},               # a numeric reference is stored in the form the marker reads
    "report": {"data", "marker"},                # the dataset card records the marker's version
    "bench": {"data", "generation", "marker"},
    "config": {"data", "models", "sources"},     # validators check names against the loaders and the models
}


def pipeline_part(module: str) -> str | None:
    """lossaverse.pipeline.marker.mark -> marker; lossaverse.pipeline.config -> config;
    lossaverse.pipeline itself -> "" (its __init__); a module of another layer -> None."""
    if module != PIPELINE and not module.startswith(PIPELINE + "."):
        return None
    return module[len(PIPELINE) + 1:].split(".")[0]


PIPELINE_MODULES = {m: pipeline_part(m) for m in MODULES if pipeline_part(m)}


def test_every_pipeline_module_is_in_a_declared_part():
    """A new subpackage (or a module left at pipeline/'s top) is declared in DEPENDS before it is used."""
    undeclared = sorted(f"{m} ({part})" for m, part in PIPELINE_MODULES.items() if part not in DEPENDS)
    assert not undeclared, "declare these pipeline parts in DEPENDS, or move the modules into one: " + "; ".join(undeclared)
    assert set(DEPENDS) == set(PIPELINE_MODULES.values()), "DEPENDS names a part that has no modules"


def test_the_declared_neighbours_exist_and_have_no_cycle():
    unknown = sorted(f"{p} -> {d}" for p, deps in DEPENDS.items() for d in deps if d not in DEPENDS or d == p)
    assert not unknown, "DEPENDS names parts that are not declared (or a part itself): " + "; ".join(unknown)
    try:
        tuple(graphlib.TopologicalSorter(DEPENDS).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"the pipeline parts' declared neighbours form a cycle: {' -> '.join(exc.args[1])}")


def test_pipeline_modules_import_only_their_part_and_its_declared_neighbours():
    """At module top or inside functions alike; imports outside lossaverse.pipeline are the layer tests' concern."""
    crossing = sorted(
        f"{m} ({part}) imports {t}"
        for m, part in PIPELINE_MODULES.items() if part in DEPENDS
        for t in GRAPH[m]
        if pipeline_part(t) is not None and pipeline_part(t) != part and pipeline_part(t) not in DEPENDS[part]
    )
    assert not crossing, (
        "a pipeline part imports only itself and its neighbours in DEPENDS; move the shared code to a lower part, "
        "pass it in from the caller, or declare the dependency (keeping DEPENDS acyclic): " + "; ".join(crossing)
    )
