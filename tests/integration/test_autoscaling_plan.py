"""The generation plan on an autoscaling cluster: one that fits the autoscaler's maximum nodes but
not the nodes alive now is accepted, and the autoscaler then adds the nodes it needs.

The cluster is Ray's fake multi-node autoscaler (`RAY_FAKE_CLUSTER`, the provider behind
`ray.cluster_utils.AutoscalingCluster`): a head of 1 CPU and up to 2 worker nodes of 2 CPUs that
the autoscaler starts as real raylets on demand. It is started here as AutoscalingCluster.start
does, without its `ray stop --force` (which would stop every Ray on the machine), and stopped by pid.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.multinode import PYTHON, alive, descendants, driver_env, free_port

pytestmark = pytest.mark.integration

WORKER = {"resources": {"CPU": 2, "gen": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}


def autoscaling_config(gcs: str) -> dict:
    """AutoscalingCluster's generated config (its example.yaml, fake_multi_node/example.yaml in Ray's
    repository, is not in the wheel). The provider's three flags are what make one host work: the
    nodes all share its IP, so the autoscaler tells them apart by node id; it starts raylets itself,
    so there is no node to set up over SSH, and no launch config to compare."""
    provider = {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                "disable_node_updaters": True, "disable_launch_config_check": True}
    return {
        "cluster_name": "lossaverse-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": provider, "auth": {}, "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                                 "cpu2": WORKER},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    import tempfile

    from ray._private.services import get_node_ip_address

    temp_dir = tempfile.mkdtemp(prefix="lvas-", dir="/tmp")  # short: Unix socket paths
    port = free_port()
    config = os.path.join(temp_dir, "autoscaler.json")
    with open(config, "w") as f:
        json.dump(autoscaling_config(f"{get_node_ip_address()}:{port}"), f)
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(PYTHON), "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         f"--autoscaling-config={config}", f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
         # ports of its own: the defaults may be taken by another Ray on this machine
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield {"address": f"{get_node_ip_address()}:{port}", "temp_dir": temp_dir}
    finally:
        pids = descendants([head.pid])  # the head's services and the worker nodes the autoscaler started
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=30)
        deadline = time.time() + 10
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not [p for p in pids if alive(p)]


def autoscaler_log(cluster: dict, chars: int = 3000) -> str:
    """The end of the head's and the autoscaler's logs, for a failure message."""
    temp = Path(cluster["temp_dir"])
    out = []
    for path in [temp / "head.log", *sorted(temp.glob("session_latest/logs/monitor.*"))]:
        with contextlib.suppress(OSError):
            out.append(f"\n--- {path.name}\n" + path.read_text(errors="replace")[-chars:])
    return "".join(out)


DRIVER = """
import json, sys, time
import ray
from lossaverse.cluster.config import EngineConfig, RayConfig
from lossaverse.cluster.plan import PlanError, check_plan, placements
from lossaverse.cluster.ray_env import init_ray, ray_nodes
from lossaverse.pipeline.generation.generate import Competitor

declared = RayConfig(node_types={"cpu2": {"resources": {"CPU": 2, "gen": 1}, "max_workers": 2}})
for _ in range(120):  # the head registers
    try:
        print(init_ray(declared, sys.argv[1])); break
    except Exception:
        time.sleep(0.5)
engine = EngineConfig(num_cpus=2, resources={"gen": 1})
plan = placements([Competitor("large", "L", engine=engine), Competitor("small", "S", engine=engine)])
out = {"alive": len([n for n in ray.nodes() if n["Alive"]])}
try:
    check_plan(plan, ray_nodes(RayConfig()))
    out["alive_only"] = "accepted"
except PlanError as exc:
    out["alive_only"] = str(exc)
check_plan(plan, ray_nodes())  # the node types init_ray was given
out["with_autoscaler"] = "accepted"

@ray.remote(num_cpus=2, resources={"gen": 1})
class Engine:  # one per replica of the plan, as Ray Data LLM requests them
    def node(self):
        return ray.get_runtime_context().get_node_id()

start = time.time()
engines = [Engine.remote() for _ in plan]
out["engine_nodes"] = len(set(ray.get([e.node.remote() for e in engines], timeout=240)))
out["scale_up_s"] = round(time.time() - start, 1)
out["alive_after"] = len([n for n in ray.nodes() if n["Alive"]])
print("RESULT " + json.dumps(out))
"""


def test_a_plan_that_fits_the_autoscalers_maximum_but_not_the_alive_nodes_is_accepted_and_runs(autoscaling):
    from tests.conftest import ROOT

    done = subprocess.run([PYTHON, "-c", DRIVER, autoscaling["address"]], cwd=ROOT, env=driver_env(), capture_output=True,
                          text=True, timeout=330)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:] + autoscaler_log(autoscaling)
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["alive"] == 1  # the head alone
    assert "needs 5 CPU at once" in result["alive_only"]  # refused on the alive nodes only
    assert result["with_autoscaler"] == "accepted"
    assert result["engine_nodes"] == 2 and result["alive_after"] == 3  # the autoscaler added both nodes
    print(f"\nautoscaler: 2 nodes added, both replicas placed in {result['scale_up_s']} s")
