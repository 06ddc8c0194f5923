"""`lossaverse submit` to the multi-node cluster (tests/conftest.py `multinode`) through its dashboard
address, as a user would: the project is uploaded as the job's working_dir, the job's driver runs on
the head and its generate stage places each competitor's engine on the node its resource names.
"""

import time

import pytest
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors

from lossaverse.pipeline.rundir import read_table
from lossaverse.pipeline.schemas import ANSWERS
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e

N_TRAIN, SAMPLES = 8, 1
ENGINE = "vLLMEngineStage"  # in the name of the Ray Data actor that holds a vLLM engine


def overrides(tmp) -> list[str]:
    sets = [f"output_dir={tmp}", "name=submitted", "ray.shared_storage=true",  # every node of this host sees tmp
            f"benchmark.n_train={N_TRAIN}", "benchmark.n_validation=0", "benchmark.n_eval=4",
            f"generate.sampling.samples={SAMPLES}", "generate.sampling.max_tokens=16", "generate.engine.batch_size=4",
            "competitors.large.engine.resources={gen_large: 1}", "competitors.small.engine.resources={gen_small: 1}"]
    return [arg for s in sets for arg in ("--set", s)]


def engine_nodes(dashboard: str, job_id: str) -> set[str]:
    """The node ids of the job's engine actors, from Ray's state API (dead actors included)."""
    actors = list_actors(address=dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=1000,
                         raise_on_missing_output=False)
    return {a.node_id for a in actors if ENGINE in (a.repr_name or "") + a.class_name}


def test_a_submitted_generate_job_succeeds_with_its_engines_on_two_nodes(multinode, tmp_path):
    multinode.wait_jobs_api()
    start = time.monotonic()
    out = run_cli("submit", "configs/local.yaml", "--command", "generate", *overrides(tmp_path),
                  "--address", multinode.dashboard, timeout=900)
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    job = next(l for l in lines if l.startswith("submitted job ")).split()[-1]
    assert lines[-1] == f"job {job}: SUCCEEDED"
    assert f"ray: connected to {multinode.address}" in out.stdout  # the job's driver joined this cluster

    answers = read_table(tmp_path / "submitted" / "answers", ANSWERS)
    keys = set(zip(answers["competitor"].to_pylist(), answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert answers.num_rows == len(keys) == 2 * N_TRAIN * SAMPLES
    assert answers.filter(answers["error"].is_valid()).num_rows == 0

    details = JobSubmissionClient(multinode.dashboard).get_job_info(job)
    names = {multinode.node_id(n): n for n in multinode.nodes}
    on = {names.get(node, node) for node in engine_nodes(multinode.dashboard, details.driver_info.id)}
    assert "node_c" in on and len(on & {"node_b", "node_d"}) == 1 and len(on) == 2, on
    print(f"submitted generate job: {seconds:.0f} s, engines on {sorted(on)}")
