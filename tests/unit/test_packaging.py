"""The installed package: a non-editable wheel, installed in a fresh venv, adds one import name,
`lossaverse`, with the stage folders under it, and its console script.

The fresh venv gets the project's dependencies through a `.pth` line naming this venv's site-packages
(installing torch, Ray and vLLM again would take minutes); this venv's editable install is not seen
there, since a `.pth` path line does not run that directory's own `.pth` files."""

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "lossaverse", "cluster", "pipeline", "training", "serving"]


def fresh_venv(path: Path) -> tuple[Path, Path]:
    """A venv without pip or packages at `path`: (its python, its site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    return python, site


def see_project_deps(site: Path) -> None:
    """Let the venv import this venv's packages (the dependencies), not its editable install."""
    (site / "_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, its site-packages, the names the install added there, the wheel's path)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp / "dist").glob("lossaverse-*.whl")
    python, site = fresh_venv(tmp / "venv")
    before = set(p.name for p in site.iterdir())
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    added = set(p.name for p in site.iterdir()) - before
    see_project_deps(site)
    return python, site, added, wheel


def test_the_wheel_holds_one_top_level_package(installed):
    *_, wheel = installed
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lossaverse"}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lossaverse/pipeline/marker/mark.py", "lossaverse/cluster/cli.py", "lossaverse/serving/marker.py",
            "lossaverse/training/deepspeed/zero3.json", "lossaverse/pipeline/marker/suites/model_outputs.jsonl",
            "lossaverse/pipeline/marker/suites/math_verify_cases.jsonl"} <= names


def test_installing_adds_only_lossaverse(installed):
    _, _, added, _ = installed
    assert {a for a in added if not a.endswith(".dist-info")} == {"lossaverse"}


def test_the_installed_modules_import_from_the_install_and_the_bare_names_do_not_exist(installed, tmp_path):
    python, site, _, _ = installed
    probe = ("import importlib.util as u, lossaverse.pipeline.marker.mark as m, lossaverse.cluster.cli as c, lossaverse.training.zero as z;"
             "print(m.__file__); print(c.__file__); print(z.__file__);"
             "print([n for n in ('cluster', 'pipeline', 'training', 'serving') if u.find_spec(n)])")
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *files, bare = out.stdout.strip().splitlines()
    assert all(f.startswith(str(site / "lossaverse")) for f in files), files
    assert bare == "[]"
    verdict = subprocess.run([python, "-c", "import lossaverse as lv; t = lv.mark([{'kind': 'numeric', 'reference': '42', "
                              "'completion': 'The answer is 42.'}]); print(t.column('correct').to_pylist())"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert verdict.stdout.strip().splitlines()[-1:] == ["[True]"], verdict.stderr[-3000:]
    # The marker's suite is package data: `lossaverse bench mark` reads it from the install, not a checkout.
    suite = subprocess.run([python, "-c", "import importlib.resources as r; f = r.files('lossaverse.pipeline.marker.suites') / "
                            "'model_outputs.jsonl'; print(str(f).startswith(%r), len(f.read_text().splitlines()) > 100)" % str(site)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert suite.stdout.split() == ["True", "True"], suite.stderr[-3000:]


def test_the_console_script_runs_from_the_install(installed, tmp_path):
    python, *_ = installed
    out = subprocess.run([python.parent / "lossaverse", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run" in out.stdout and "serve" in out.stdout


def test_a_source_tree_on_pythonpath_imports_its_own_folders(tmp_path):
    """Not installed (a checkout on PYTHONPATH, a Ray job's uploaded working_dir): lossaverse.pipeline is
    the tree's top-level pipeline/ folder."""
    python, site = fresh_venv(tmp_path / "venv")
    see_project_deps(site)
    probe = "import lossaverse.pipeline.marker.mark as m, lossaverse.serving.marker as s; print(m.__file__); print(s.__file__)"
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(ROOT / "pipeline" / "marker" / "mark.py"), str(ROOT / "serving" / "marker.py")]


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject lists its packages by hand (the stage folders map onto lossaverse.*): a subpackage folder
    left out of `packages` would import from a checkout and be missing from the wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(setuptools["packages"]), {"lossaverse": "lossaverse", **setuptools["package-dir"]}
    found = set()
    for package, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((package, *init.parent.relative_to(ROOT / folder).parts)))
    assert not found - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert set(dirs) <= listed
    # And the other way: every listed package is a folder (a data folder such as training/deepspeed has no __init__).
    def folder(pkg: str) -> Path:
        parent = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len)
        return ROOT / dirs[parent] / Path(*pkg[len(parent):].split(".")[1:])
    assert not [p for p in listed if not folder(p).is_dir()], "pyproject lists packages with no folder"
