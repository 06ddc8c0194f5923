"""Faults on the multi-node cluster (tests/conftest.py `multinode`): jobs connect by `--address`.

The generate stage runs on three worker nodes with each competitor pinned by a custom resource:
`large` to node_b or node_d (`gen_large`), `small` to node_c (`gen_small`). Killing the node that
holds the large engine, with every one of its processes at once, must cost time only: Ray restarts
the engine actor on the other `gen_large` node, retries the batches lost with it, and the answers
hold exactly one row per (item, competitor, sample).
"""

import time
from pathlib import Path

import pytest
import yaml

from pipeline.rundir import read_table
from pipeline.schemas import ANSWERS
from tests.conftest import MULTINODE_NODES, ROOT
from tests.multinode import Job

pytestmark = pytest.mark.e2e

N_TRAIN, SAMPLES = 48, 2
ENGINE = "vLLMEngineStage"  # in the title of the engine actor's worker process


def write_config(tmp: Path, name: str, shared: bool = True) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    cfg.update(name=name, output_dir=str(tmp))
    cfg["ray"] = {"shared_storage": shared}  # every node of this one-host cluster sees tmp
    cfg["benchmark"].update(n_train=N_TRAIN, n_validation=0, n_eval=4)
    cfg["generate"].update(shard_items=4, progress_interval_s=1)
    cfg["generate"]["engine"].update(batch_size=4)
    cfg["generate"]["sampling"].update(samples=SAMPLES, max_tokens=24)
    cfg["competitors"]["large"]["engine"] = {"resources": {"gen_large": 1}}
    cfg["competitors"]["small"]["engine"] = {"resources": {"gen_small": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_generate(config: Path, address: str) -> Job:
    return Job("generate", config, address)


def engine_nodes(cluster) -> set[str]:
    return {name for name in cluster.nodes if cluster.holds(name, ENGINE)}


def assert_conserved(run_dir: Path) -> None:
    answers = read_table(run_dir / "answers", ANSWERS)
    keys = list(zip(answers["competitor"].to_pylist(), answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * N_TRAIN * SAMPLES  # none lost, none twice
    assert answers.filter(answers["error"].is_valid()).num_rows == 0


@pytest.fixture(scope="module")
def undisturbed(multinode, tmp_path_factory):
    """The job on all three nodes, nothing killed: where each engine ran, and its wall time."""
    tmp = tmp_path_factory.mktemp("gen")
    start = time.time()
    job = start_generate(write_config(tmp, "calm"), multinode.address)
    seen: set[str] = set()
    try:
        while job.poll() is None and time.time() < start + 900:
            seen |= engine_nodes(multinode)
            time.sleep(0.2)
    finally:
        job.stop()
    out = job.output
    assert job.poll() == 0, out[-3000:]
    return {"run_dir": tmp / "calm", "seconds": time.time() - start, "engines_on": seen, "out": out}


def test_engines_run_on_the_nodes_their_resources_name(undisturbed):
    assert "ray: connected to" in undisturbed["out"]
    on = undisturbed["engines_on"]
    assert "node_c" in on  # small: the only gen_small node
    assert len(on & {"node_b", "node_d"}) == 1  # large: one replica, on a gen_large node
    assert_conserved(undisturbed["run_dir"])


def test_a_local_output_dir_on_several_nodes_is_refused_with_the_fix(multinode, tmp_path):
    job = start_generate(write_config(tmp_path, "local", shared=False), multinode.address)
    code = job.wait(timeout=180)
    out = job.output
    assert code == 2, out[-3000:]
    assert "4 nodes" in out and "every node mounts" in out and "ray.shared_storage=true" in out
    assert not (tmp_path / "local" / "answers").exists()
