"""The shared-storage rule: a run over several nodes needs a run directory every node sees."""

import pytest

from lossaverse.cluster.config import ConfigError
from lossaverse.cluster.ray_env import check_shared_storage, filesystem_of

MOUNTS = """overlay / overlay rw 0 0
tmpfs /tmp tmpfs rw 0 0
10.0.0.5:/export /mnt/runs nfs4 rw 0 0
/dev/sda1 /mnt/runs/local ext4 rw 0 0
"""


def test_the_filesystem_is_that_of_the_longest_mount_point(tmp_path):
    assert filesystem_of("/mnt/runs/job-1/items", MOUNTS) == "nfs4"
    assert filesystem_of("/mnt/runs/local/x", MOUNTS) == "ext4"
    assert filesystem_of("/mnt/runsx", MOUNTS) == "overlay"
    assert filesystem_of("/tmp/a/b", MOUNTS) == "tmpfs"


def test_a_local_output_dir_on_several_nodes_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"local filesystem \(ext4\).*3 nodes.*every node mounts.*ray.shared_storage=true"):
        check_shared_storage("runs", nodes=3, declared=False, fs_type="ext4")


def test_one_node_a_network_filesystem_or_a_declared_share_is_accepted():
    check_shared_storage("runs", nodes=1, declared=False, fs_type="ext4")
    check_shared_storage("/mnt/runs", nodes=3, declared=False, fs_type="nfs4")
    check_shared_storage("/mnt/runs", nodes=3, declared=False, fs_type="fuse.gcsfuse")
    check_shared_storage("runs", nodes=3, declared=True, fs_type="ext4")
