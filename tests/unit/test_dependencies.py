"""Every third-party module the code imports is declared in pyproject.toml (a dependency or an
extra), not left to arrive through another package's requirements."""

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import ROOT

PACKAGES = ("lossaverse", "cluster", "pipeline", "training", "serving")  # folders; they import as lossaverse.*
# Modules whose distribution is not installed on every machine (the GPU extra's).
NOT_INSTALLED_HERE = {"pynvml": "nvidia-ml-py", "vllm": "vllm"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, str]:
    """Top-level module -> the first file importing it, for every import in the project's packages."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {_normal(re.match(r"[A-Za-z0-9_.-]+", s).group(0)) for s in specs}


def test_every_imported_third_party_module_is_declared():
    dists = importlib.metadata.packages_distributions()
    ours = {"lossaverse", "tests"}
    want = declared()
    missing = []
    for module, where in imported_modules().items():
        if module in sys.stdlib_module_names or module in ours or module == "__future__":
            continue
        names = dists.get(module) or [NOT_INSTALLED_HERE.get(module, module)]
        if not {_normal(n) for n in names} & want:
            missing.append(f"{module} ({where}; distribution {'/'.join(names)})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(sorted(missing))
