"""A node lost in serving, on a multi-node cluster of this test module's own (tests/multinode.py).

`lossaverse serve MODEL_DIR --address ...` serves a tiny model with two replicas, each pinned by a
custom resource (`serve_engine`) to one of two worker nodes, so each replica's node is known. A
bounded client loop on 127.0.0.1 (threads of sequential requests, each with its own timeout) runs
while the node of one replica dies (every process at once, no graceful shutdown) and a fresh node
of the same resources takes its place; Serve starts the replacement replica there.

What must hold: every request ends within its bound (an answer, a 5xx or a clear connection
error, never a hang: Serve's `serve.request_timeout_s` answers 408 well before the client's
timeout), most requests are answered, and once the replacement runs the last requests all are.

The module's own cluster, not the session's: the test kills one of its nodes. Cost on 2 CPU
cores: two vLLM CPU engines start (1-3 minutes, more under load), then the replacement (as long).
"""

import concurrent.futures
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from lossaverse.pipeline.models.tinymodels import resolve_model
from tests.conftest import LOSSAVERSE, ROOT, stop_group
from tests.multinode import MultiNode, driver_env, free_port

pytestmark = pytest.mark.e2e

NODES = ("serve_a", "serve_b")  # each holds one model replica (resource serve_engine: 1)
REPLICA = "LLMServer"  # in the deployment name of the model replicas (`LLMServer:target`)
REQUEST_TIMEOUT_S = 20  # serve.request_timeout_s: Serve's 408 for a request that would hang
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 40  # the client's own bound: reached only by a hang
CLIENTS = 3  # threads, one request in flight each
STARTUP_S = 900  # two engines starting on a loaded 2-core machine
REPLACE_S = 600  # from the kill until the replacement replica is RUNNING
LAST_N = 20  # requests after the replacement runs, every one answered
MIN_SHARE = 0.8  # answered of all requests sent: the other replica answers while one is lost
SETS = ["serve.engine.kv_cache_gib=0.25", "serve.engine.max_model_len=128", "serve.engine.enforce_eager=true",
        "serve.engine.num_cpus=1", "serve.engine.resources.serve_engine=1", "serve.min_replicas=2",
        "serve.max_replicas=2", "serve.marker=false", f"serve.request_timeout_s={REQUEST_TIMEOUT_S}"]


@pytest.fixture
def cluster():
    c = MultiNode(head_cpus=1)  # the dashboard: Serve's REST API says where each replica runs
    try:
        for name in NODES:
            c.add(name, num_cpus=2, resources={"serve_engine": 1})
        yield c
    finally:
        left = c.shutdown()
    assert not left, f"processes of the serving cluster still alive after its teardown: {left}"


def replicas(cluster: MultiNode) -> list[dict]:
    """The model replicas Serve knows (state, node_id, replica_id, log_file_path), from its REST API."""
    try:
        apps = httpx.get(f"{cluster.dashboard}/api/serve/applications/", timeout=10).json().get("applications") or {}
    except (httpx.HTTPError, ValueError):
        return []
    return [r for app in apps.values() for name, d in (app.get("deployments") or {}).items()
            if REPLICA in name for r in d.get("replicas", [])]


def running_on(cluster: MultiNode) -> dict[str, dict]:
    """node name -> the RUNNING model replica there."""
    names = {node.node_id: name for name, node in cluster.nodes.items()}
    return {names.get(r["node_id"], r["node_id"]): r for r in replicas(cluster) if r["state"] == "RUNNING"}


class Load:
    """`CLIENTS` threads, each sending one completion request at a time until stopped; every
    request is recorded as (sent, seconds, status or None, error message)."""

    def __init__(self, base: str):
        self.base, self.stop, self.results, self.lock = base, threading.Event(), [], threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(CLIENTS)
        self.futures = [self.pool.submit(self._loop, i) for i in range(CLIENTS)]

    def _loop(self, i: int) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                body = {"model": "target", "prompt": f"{i} + {n} =", "max_tokens": 8, "temperature": 0}
                sent = time.time()
                try:
                    r = client.post(f"{self.base}/v1/completions", json=body)
                    ok = r.status_code == 200 and bool(r.json()["choices"])
                    entry = (sent, time.time() - sent, r.status_code, "" if ok else r.text[:300])
                except httpx.HTTPError as exc:  # the connection itself failed: say how
                    entry = (sent, time.time() - sent, None, f"{type(exc).__name__}: {exc}"[:300])
                with self.lock:
                    self.results.append(entry)
                if entry[2] != 200:
                    time.sleep(0.2)  # a failing server is not hammered

    def since(self, t: float) -> list[tuple]:
        with self.lock:
            return [e for e in self.results if e[0] >= t]

    def finish(self) -> list[tuple]:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=CLIENT_TIMEOUT_S + 30)
        self.pool.shutdown()
        return sorted(self.results)


def _until(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        if proc.poll() is not None:
            pytest.fail(f"`lossaverse serve` ended (exit {proc.poll()}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {what} in {timeout} s:\n{log.read_text()[-4000:]}")


def test_a_lost_replica_node_costs_some_requests_none_hangs_and_a_replacement_runs_on_the_fresh_node(cluster, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [*LOSSAVERSE, "serve", resolve_model("tiny:small"), "--address", cluster.address, "--set", f"serve.port={port}"]
    for s in SETS:
        argv += ["--set", s]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=driver_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    load = None
    try:
        began = time.time()
        _until(lambda: "serving; Ctrl-C to stop" in log.read_text(), STARTUP_S, "the app RUNNING", proc, log)
        placed = _until(lambda: (p := running_on(cluster)) and set(p) == set(NODES) and p, 60, "a replica on each node", proc, log)
        up = time.time() - began

        load = Load(base)
        time.sleep(5)  # answers from both replicas before the loss
        assert load.since(0) and all(e[2] == 200 for e in load.since(0)), load.since(0)[:5]
        ingress = next((n for n in NODES if cluster.holds(n, "Ingress")), "head")
        victim = next(n for n in NODES if n != ingress)  # a node of a model replica only
        lost = placed[victim]
        died = cluster.kill(victim)
        fresh = cluster.add(victim, num_cpus=2, resources={"serve_engine": 1})  # same resources, a new raylet

        def replaced():
            r = running_on(cluster).get(victim)
            return r if r and r["replica_id"] != lost["replica_id"] else None

        new = _until(replaced, REPLACE_S, "replacement replica RUNNING", proc, log)
        running = time.time()
        _until(lambda: len(load.since(running)) >= LAST_N, 120, f"{LAST_N} requests after the replacement", proc, log)
        results = load.finish()
        load = None
    finally:
        if load is not None:
            load.stop.set()
        stop_group(proc)  # on the cluster too: the command shuts its Serve apps down

    failed = [e for e in results if e[2] != 200]
    share = 1 - len(failed) / len(results)
    codes = sorted({str(e[2]) for e in failed})
    print(f"\nserve up in {up:.0f} s; {len(results)} requests, {share:.1%} answered, {len(failed)} failed "
          f"(status {', '.join(codes) or '-'}); replacement RUNNING {running - died:.0f} s after the kill; slowest request {max(e[1] for e in results):.1f} s")
    for e in failed:
        print(f"  failed {e[0] - died:+.1f} s from the kill after {e[1]:.1f} s: {e[2]} {e[3]}")

    assert all(e[1] < CLIENT_TIMEOUT_S for e in results), "a request hung until the client's timeout"
    assert all(e[2] is None or e[2] >= 500 or e[2] == 408 for e in failed), failed  # never a 4xx of a good request
    assert all(e[3] for e in failed), failed  # every failure says what happened
    assert share >= MIN_SHARE, (share, failed)
    assert all(e[2] == 200 for e in results[-LAST_N:]), results[-LAST_N:]
    assert new["node_id"] == fresh.node_id and new["node_id"] != lost["node_id"]
