"""`lossaverse.run` on a Ray the caller started: one stage runs, a finished one is skipped, and the
caller's Ray is left running."""

from pathlib import Path

import pytest

import lossaverse as lv
from lossaverse.pipeline.data.rundir import read_table

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_run_one_stage_on_the_callers_ray_then_read_its_results(local_ray, tmp_path):
    cfg = lv.load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path}", "benchmark.n_train=40",
                                                          "benchmark.n_validation=10", "benchmark.n_eval=20"])
    lines: list[str] = []
    run_dir = lv.run(cfg, ["items"], report=lines.append)
    assert run_dir == tmp_path / "tiny" and local_ray.is_initialized()  # the caller's Ray, still up
    assert lines[0] == "ray: already initialized"
    items = read_table(run_dir / "items")
    assert items.num_rows == 70 and sorted(set(items["split"].to_pylist())) == ["eval", "train", "validation"]
    stage = lv.results(run_dir)["stages"]["items"]
    assert (stage["train"], stage["validation"], stage["eval"]) == (40, 10, 20)

    lines.clear()
    lv.run(cfg, ["items"], report=lines.append)  # finished and unchanged: skipped, Ray not asked for
    assert lines[0] == "every stage is complete: Ray not started" and local_ray.is_initialized()
    assert any("items" in line and "skip" in line for line in lines), lines
    lines.clear()
    lv.run(cfg, ["items"], force=True, report=lines.append)  # forced: it runs, on the caller's Ray
    assert lines[0] == "ray: already initialized" and any("done" in line and "items" in line for line in lines), lines
