"""The error `lossaverse train` stops with when Ray Train cannot place its worker group (no Ray runs)."""

import json

from ray.train import ControllerError
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

from lossaverse.cluster.config import TrainConfig
from lossaverse.training.train import unplaced


def test_a_placement_timeout_names_the_wait_the_fix_and_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    (tmp_path / "status").mkdir()
    for rank, step in ((0, 8), (1, 8)):
        (tmp_path / "status" / f"rank{rank}.json").write_text(json.dumps({"last_checkpoint_step": step}))
    train = TrainConfig(num_workers=2, cpus_per_worker=1.5, placement_strategy="STRICT_SPREAD", max_failures=1)
    error = unplaced(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)), train, tmp_path)
    assert str(error) == (
        "training stopped: 2 workers of 1.5 CPU each (STRICT_SPREAD) could not be placed in 2 tries of 20 s: the "
        "cluster lacks the nodes they need (lost, with none in their place, or never there). Add nodes (or lower "
        "train.num_workers), then `lossaverse train CONFIG --resume` continues from the last checkpoint (step 8)")


def test_other_failures_are_left_as_they_are(tmp_path):
    train = TrainConfig()
    assert unplaced(ControllerError(WorkerGroupStartupFailedError("actor died")), train, tmp_path) is None
    assert unplaced(RuntimeError("worker died"), train, tmp_path) is None
    no_checkpoint = unplaced(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)), train, tmp_path)
    assert str(no_checkpoint).endswith("continues from the start") and "tries of 60 s" in str(no_checkpoint)


def test_the_placement_wait_comes_from_the_config(tmp_path, monkeypatch):
    import os

    from lossaverse.training.train import START_TIMEOUT_ENV, torch_trainer

    monkeypatch.setenv(START_TIMEOUT_ENV, "99")  # the config wins; undone after the test
    train = TrainConfig(start_timeout_s=15)
    assert "start_timeout_s" not in train.model_dump()  # not part of the fingerprint
    torch_trainer(train, {}, tmp_path)
    assert os.environ[START_TIMEOUT_ENV] == "15"
    error = unplaced(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)), train, tmp_path)
    assert "tries of 15 s" in str(error)


def test_the_named_checkpoint_is_the_one_ray_registered(tmp_path):
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "rank0.json").write_text(json.dumps({"last_checkpoint_step": 8}))  # saved, never registered
    (tmp_path / "ray_train").mkdir()
    (tmp_path / "ray_train" / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"checkpoint_results": [{"metrics": {"step": 4}}]}))
    error = unplaced(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)), TrainConfig(), tmp_path)
    assert str(error).endswith("continues from the last checkpoint (step 4)")
