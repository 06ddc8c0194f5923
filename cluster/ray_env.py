"""Where work runs: the one place that calls `ray.init`, and the nodes the connected cluster offers
(`ray_nodes`: those alive, plus those its autoscaler may add).

No address (and no RAY_ADDRESS): an embedded local Ray sized by `ray.num_cpus`. Otherwise connect
to the given cluster; the resources then come from the cluster itself. A run whose `output_dir`
is given is refused on a cluster of more than one node unless every node sees that directory
(`check_shared_storage`): the stages on every node read and write the run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from lossaverse.cluster.config import ConfigError
from lossaverse.cluster.logs import note_session

# The Ray config the process connected with: the plan check reads its declared node types.
_CONNECTED: list = []

# Filesystems every node of a cluster can mount at the same path.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "lustre", "beegfs", "gpfs", "9p",
                       "virtiofs", "efs", "wekafs", "orangefs"}


def init_ray(ray_cfg, address: str | None = None, output_dir: str | Path | None = None) -> str:
    """Start or connect to Ray once per process; return a one-line description. With `output_dir`,
    refuse (ConfigError) a cluster of several nodes that may not all see it."""
    import ray  # deferred: Ray loads in seconds

    address = address or ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "ray: already initialized"
    # vLLM's engine spawns processes; Ray workers inherit this and need no fork-safety dance.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")  # lossaverse.cluster.logs turns them off
    _CONNECTED[:] = [ray_cfg]
    if address:
        ray.init(address=address, log_to_driver=True)
        if output_dir is not None:
            try:
                check_shared_storage(output_dir, cluster_nodes(ray_cfg), ray_cfg.shared_storage)
            except Exception:
                ray.shutdown()
                raise
        return f"ray: connected to {address}"
    kwargs = {"num_cpus": ray_cfg.num_cpus, "include_dashboard": False, "log_to_driver": False}
    if ray_cfg.object_store_memory:
        kwargs["object_store_memory"] = ray_cfg.object_store_memory
    context = ray.init(**kwargs)

    note_session(getattr(context, "address_info", {}).get("session_dir"))
    return f"ray: embedded local ({ray_cfg.num_cpus} logical CPUs)"


def connected_config():
    """The RayConfig given to `init_ray` in this process, or None."""
    return _CONNECTED[0] if _CONNECTED else None


def cluster_nodes(ray_cfg) -> int:
    """How many nodes work may run on: alive now, plus those the autoscaler may add."""
    return len(ray_nodes(ray_cfg))


def node_groups(ray_cfg=None) -> list[dict]:
    """The autoscaler's worker node types: [{"name", "resources", "max"}]. From the cluster config
    that the autoscaler reports to the GCS (autoscaler v2, KubeRay: what Ray Train and Ray Data
    also read), else from `ray.node_types` in the run config."""
    import ray  # deferred: Ray loads in seconds

    config = ray._private.state.state.get_cluster_config()
    groups = [{"name": g.name, "resources": {k: float(v) for k, v in g.resources.items()}, "max": g.max_count}
              for g in (config.node_group_configs if config else []) if g.max_count != 0]
    if groups:
        return groups
    types = ray_cfg.node_types if ray_cfg is not None else {}
    return [{"name": n, "resources": dict(t.resources), "max": t.max_workers} for n, t in types.items()]


def with_autoscaling(alive: list[dict], groups: list[dict]) -> list[dict]:
    """`alive` plus the nodes each group can still add (its max less its alive nodes, which are
    those with the group's resources; -1, no limit, counts as enough for any plan: 64 nodes)."""
    nodes = list(alive)
    for g in groups:
        running = sum(1 for n in alive if all(n.get(k) == v for k, v in g["resources"].items()))
        limit = 64 if g["max"] < 0 else g["max"]
        nodes += [dict(g["resources"], pending=1.0) for _ in range(max(0, limit - running))]
    return nodes


def ray_nodes(ray_cfg=None) -> list[dict]:
    """The resources of the nodes the plan may use: the alive nodes of the connected Ray cluster,
    plus those its autoscaler can still add (marked `pending`). `ray_cfg` defaults to the config
    the cluster was connected with (`init_ray`)."""
    import ray  # deferred: Ray loads in seconds

    alive = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return with_autoscaling(alive, node_groups(ray_cfg if ray_cfg is not None else connected_config()))


def filesystem_of(path: str | Path, mounts: str | None = None) -> str:
    """The type of the filesystem that holds `path` (its nearest existing ancestor), from
    /proc/mounts (or `mounts`, that file's text): the mount point that is its longest prefix."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    path = existing.resolve() / path.relative_to(existing)  # symlinks resolved where they exist
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_shared(fs_type: str) -> bool:
    return fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse.")


def check_shared_storage(output_dir: str | Path, nodes: int, declared: bool, fs_type: str | None = None) -> None:
    """Refuse a run over several nodes whose run directory only this machine may see.

    Every stage reads its input and writes its output under output_dir from whichever node runs
    it (Ray Data blocks, Ray Train checkpoints, the served model), so on a cluster that directory
    must be one path that every node mounts. On one machine any path is trivially shared; a
    cluster of several nodes on one host (tests) declares it with `ray.shared_storage`."""
    if nodes <= 1 or declared:
        return
    fs_type = fs_type or filesystem_of(output_dir)
    if is_shared(fs_type):
        return
    raise ConfigError(
        f"output_dir {output_dir} is on a local filesystem ({fs_type}) of this machine, but the Ray cluster has "
        f"{nodes} nodes and each of them reads and writes the run directory: set output_dir to a path every node "
        "mounts at the same place (NFS, CephFS, EFS or Filestore; on Kubernetes the ReadWriteMany volume of "
        "k8s/base/pvc.yaml at /mnt/runs), or set ray.shared_storage=true if this path already is one"
    )


def shutdown_ray() -> None:
    import ray  # deferred: Ray loads in seconds

    if ray.is_initialized():
        ray.shutdown()
    _CONNECTED.clear()
