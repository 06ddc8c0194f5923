"""A real multi-node Ray cluster on 127.0.0.1 for the integration and e2e tiers.

`ray.cluster_utils.Cluster`, as in Ray's own test suite: every node is its own raylet with its own
object store and worker processes; the head also runs the GCS. Nodes are named and carry a custom
resource of their name (`{"node_b": 1}`) plus whatever a test adds, so placement is visible.
Jobs connect to it by address, as a user would (`lossaverse ... --address`); the pytest process
itself never calls `ray.init` on it (the integration tier's embedded Ray may live in it).

`kill(name)` is a node's death: every process of the node and every process they started (vLLM's
engine processes included) gets SIGKILL at once, with no graceful shutdown; Ray then sees the node
die through its missed heartbeats. Teardown kills by pid as well, then checks none is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them."""
    tree, out, todo = _children(), [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def _own_address_file(temp_dir: str):
    """Cluster's head writes its address to /tmp/ray/ray_current_cluster, where `ray.init("auto")`
    and `ray status` of every other Ray user on the machine would find it: keep it in our temp dir."""
    import ray._private.utils as utils

    original = utils.write_ray_address
    utils.write_ray_address = lambda address, _dir=None: original(address, temp_dir)
    try:
        yield
    finally:
        utils.write_ray_address = original


class MultiNode:
    """A head (1 CPU, the driver's home, never killed) and named worker nodes."""

    def __init__(self, head_cpus: float = 1, object_store_mib: int = 100, dashboard: bool = True):
        from ray.cluster_utils import Cluster

        # Short: Ray's Unix socket paths under it must stay within 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="lvmn-", dir="/tmp")
        self.object_store = object_store_mib * 2**20
        self.dashboard_port, self.agent_port = free_port(), free_port()
        self.nodes: dict = {}
        self.pids: set[int] = set()
        # A loopback-only test cluster: no token auth, as for the embedded Ray a driver starts.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        # A submitted job's entrypoint (`lossaverse ...`) runs in the head's environment: this venv's bin.
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        # DeepSpeed builds its CPU comm op into ~/.cache/torch_extensions; other checkouts on this
        # machine build it there against their own venv, and every load then rebuilds it (measured:
        # 300 s, 78 s of gcc). This venv's own folder: built once, then loaded in a second.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        # Each node's dashboard agent gets a port of its own: on its default (52365), taken by any other
        # Ray on this machine, the agent lives on without HTTP and the Jobs API finds "no available agent".
        head = {"num_cpus": head_cpus, "resources": {"head": 1}, "temp_dir": self.temp_dir,
                "object_store_memory": self.object_store, "include_dashboard": dashboard,
                "dashboard_agent_listen_port": self.agent_port,  # dashboard: the Jobs and state APIs, ~2 s more
                "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port}  # a free port even when off
        # Ray waits 60 s for the dashboard to start, read when ray is imported; its Python start has
        # taken longer on this loaded machine, and the head then fails. A generous bound instead.
        import ray._private.ray_constants as ray_constants

        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S, 300)
        self.cluster = self._retried(lambda: Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args=head))
        self._remember(self.cluster.head_node)

    def _retried(self, start):
        """`start()` a node, a second time if the first fails. On a loaded machine a raylet can give up
        waiting for its agents (Python processes slow to start) and exit; what it left is killed."""
        for attempt in (1, 2):
            try:
                with _own_address_file(self.temp_dir):
                    return start()
            except Exception:
                self._kill_strays()
                if attempt == 2:
                    if not self.pids:
                        shutil.rmtree(self.temp_dir, ignore_errors=True)
                    raise

    @property
    def address(self) -> str:
        """What a user passes to `--address` (the GCS of the head)."""
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_jobs_api(self, timeout: float = 120) -> None:
        """Until the Jobs API can take a submission: the dashboard answers and the head's agent, which
        runs the jobs, listens (it registers with the dashboard just after)."""
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.dashboard}/api/jobs/", timeout=5).status_code == 200:
                    with socket.create_connection((self.cluster.head_node.node_ip_address, self.agent_port), timeout=5):
                        return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Jobs API at {self.dashboard} was not ready in {timeout} s")

    def _remember(self, node) -> None:
        for procs in node.all_processes.values():
            self.pids.update(p.process.pid for p in procs)

    def node_pids(self, node) -> list[int]:
        return [p.process.pid for procs in node.all_processes.values() for p in procs]

    def _kill_strays(self) -> None:
        """Kill the processes of this cluster (its temp dir is in their command line) that a failed
        start left without a handle, and what they started."""
        known = set(descendants(sorted(self.pids)))  # the live nodes' processes and their workers
        strays = [int(e) for e in os.listdir("/proc") if e.isdigit() and self.temp_dir in cmdline(int(e))]
        for pid in descendants([p for p in strays if p not in known]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def add(self, name: str, num_cpus: float, resources: dict | None = None, labels: dict | None = None):
        """Start node `name` (resource `name: 1` plus `resources`) and wait until Ray sees it alive."""
        node = self._retried(lambda: self._add_node(name, num_cpus, resources, labels))
        self.nodes[name] = node
        self._remember(node)
        return node

    def _add_node(self, name: str, num_cpus: float, resources: dict | None, labels: dict | None):
        return self.cluster.add_node(
            num_cpus=num_cpus, resources={name: 1, **(resources or {})}, labels={"lossaverse/node": name, **(labels or {})},
            object_store_memory=self.object_store, dashboard_agent_listen_port=free_port(),
            # The nodes of one host share the head's session folder. A job's working_dir is unpacked
            # under runtime_resources/ there; sharing it, any node that drops its copy deletes the
            # folder the job's driver runs in (transformers' import then fails in os.getcwd()).
            runtime_env_dir_name=f"runtime_resources_{name}",
        )

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def holds(self, name: str, title: str) -> bool:
        """Whether node `name` runs a worker process whose title contains `title` (e.g. the
        engine actor's class name): workers are children of their node's raylet."""
        return any(title in cmdline(pid) for pid in descendants(self.node_pids(self.nodes[name])))

    def node_of(self, pid: int) -> str | None:
        """The name of the node whose raylet runs process `pid` (or one of its ancestors)."""
        return next((name for name, node in self.nodes.items() if pid in descendants(self.node_pids(node))), None)

    def kill(self, name: str) -> float:
        """Node `name` dies: SIGKILL to all of its processes and their children at once. Returns
        the time of death (time.time())."""
        node = self.nodes.pop(name)
        doomed = descendants(self.node_pids(node))
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        died = time.time()
        self.cluster.remove_node(node, allow_graceful=False)  # already dead: reaps and forgets it
        return died

    def wait_dead(self, node_id: str, timeout: float = 60) -> None:
        """Until the GCS marks `node_id` dead (it stops hearing the raylet's health checks)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not any(n["NodeID"] == node_id and n["Alive"] for n in self.cluster.global_state.node_table()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"Ray did not mark node {node_id} dead in {timeout} s")

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.cluster.global_state.node_table() if n["Alive"]]

    def shutdown(self) -> list[int]:
        """Kill every process of the cluster by pid; return the pids still alive after (none)."""
        doomed = descendants(sorted(self.pids))
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in [*self.cluster.worker_nodes, self.cluster.head_node]:
            with contextlib.suppress(Exception):
                self.cluster.remove_node(node, allow_graceful=False)
        deadline = time.time() + 10
        while any(alive(p) for p in doomed) and time.time() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [p for p in doomed if alive(p)]


class Job:
    """`lossaverse COMMAND CONFIG --address ADDRESS ARGS...` in a child process, its output in a file
    (a pipe nobody reads while the test polls would fill up and stall the driver)."""

    def __init__(self, command: str, config: Path, address: str, *args: str, env: dict | None = None):
        from tests.conftest import LOSSAVERSE, ROOT

        self.log = config.with_name(f"{config.stem}.{command}.log")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([*LOSSAVERSE, command, str(config), "--address", address, *args], cwd=ROOT,
                                         env={**driver_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT)

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout: float = 900) -> int:
        """The exit code; a job still running after `timeout` is killed (and gets None)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def output(self) -> str:
        return self.log.read_text()


def driver_env(address: str | None = None) -> dict:
    """The environment of a job that connects to the cluster by `--address` (not RAY_ADDRESS)."""
    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


PYTHON = sys.executable
