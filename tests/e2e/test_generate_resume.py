"""A `lossaverse generate` killed mid-run and started again: exactly one row per (item, competitor,
sample), no duplicates, no gaps, and the shards written before the kill are not generated again."""

import json
import os
import signal
import subprocess
import time

import pytest

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS
from tests.conftest import LOSSAVERSE, ROOT, cli_env, run_cli

pytestmark = pytest.mark.e2e

N_TRAIN, SAMPLES = 48, 2


def test_a_killed_generate_resumes_without_duplicates_or_gaps(tmp_path):
    sets = [f"output_dir={tmp_path}", "name=resume", f"benchmark.n_train={N_TRAIN}", "benchmark.n_eval=4",
            "generate.shard_items=4", "generate.engine.batch_size=4", f"generate.sampling.samples={SAMPLES}",
            "generate.sampling.max_tokens=32", "generate.progress_interval_s=1"]
    args = ["generate", str(ROOT / "configs" / "tiny.yaml")] + [x for s in sets for x in ("--set", s)]
    shards = tmp_path / "resume" / "answers.shards"
    # Its own session: the driver and the embedded Ray it starts are killed together, by process group.
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([*LOSSAVERSE, *args], cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.time() + 600  # the embedded Ray and two engines start first; minutes on a loaded machine
        while time.time() < deadline and len(list(shards.glob("*.parquet"))) < 3:
            assert driver.poll() is None, f"generate ended (exit {driver.returncode}) before it could be interrupted: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    before = {p.name for p in shards.glob("*.parquet")}
    total_shards = 2 * (N_TRAIN // 4)
    assert 3 <= len(before) < total_shards, f"{len(before)} shards at the kill"
    assert not (tmp_path / "resume" / "answers").exists()

    again = run_cli(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in again.stdout
    answers = read_table(tmp_path / "resume" / "answers", ANSWERS)
    keys = list(zip(answers["competitor"].to_pylist(), answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * N_TRAIN * SAMPLES
    assert {p.name for p in (tmp_path / "resume" / "answers").glob("*.parquet")} >= before
    manifest = json.loads((tmp_path / "resume" / "manifest.json").read_text())
    per = manifest["stages"]["generate"]["competitors"]
    resumed = sum(c["resumed"] for c in per.values())
    assert resumed == len(before) * 4 * SAMPLES  # the finished shards were kept, not regenerated
    assert sum(c["generated"] for c in per.values()) == 2 * N_TRAIN * SAMPLES - resumed
    # A competitor whose shards were all written before the kill (tiny models answer in under a
    # second, and the two run one after the other) is resumed whole: no rows, no tokens.
    assert all((c["tokens"] > 0) == (c["generated"] > 0) and c["seconds"] > 0 for c in per.values()), per
