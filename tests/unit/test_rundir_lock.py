"""One driver per run directory: a second is refused with a message naming the first, and the
directory is free again once the first has ended (also when it was killed)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lossaverse.pipeline.data.rundir import HOLDER, Manifest, RunDirLocked
from tests.conftest import ROOT

HOLD = """
import sys, time
from lossaverse.pipeline.data.rundir import Manifest
m = Manifest(sys.argv[1])
m.update(holder="first")
print("holding", flush=True)
time.sleep(600)
"""


def _first_driver(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_driver_on_a_run_directory_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = _first_driver(run_dir)
    try:
        with pytest.raises(RunDirLocked, match=rf"in use by another driver: pid {first.pid} on .*-c"):
            Manifest(run_dir)
        assert (run_dir / HOLDER).is_file()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The OS dropped the killed driver's lock: the directory is free, and its manifest intact.
    deadline = time.time() + 10
    while True:
        try:
            m = Manifest(run_dir)
            break
        except RunDirLocked:
            assert time.time() < deadline
            time.sleep(0.1)
    assert m.data["holder"] == "first"


def test_one_driver_opens_its_manifest_as_often_as_it_likes(tmp_path):
    Manifest(tmp_path).update(a=1)
    assert Manifest(tmp_path).data["a"] == 1
