import os
import time

from torch.utils.file_baton import FileBaton

from lossaverse.training.buildlocks import clear_stale_locks, extensions_root


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert not FileBaton(str(stale)).try_acquire()  # what torch's loader sees: it would wait forever
    assert clear_stale_locks() == [stale]
    assert not stale.exists() and fresh.exists()
    baton = FileBaton(str(stale))
    assert baton.try_acquire()  # the next build takes the lock at once
    baton.release()


def test_the_default_layout_one_level_deeper_is_covered(tmp_path):
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert clear_stale_locks(tmp_path, stale_s=60, now=time.time() + 120) == [lock]
    assert clear_stale_locks(tmp_path) == []
