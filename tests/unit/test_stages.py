import pytest

from lossaverse.cluster.config import load_config
from lossaverse.cluster.stages import STAGE_NAMES, StageError, check_competitor_sizes, stage_fingerprints
from tests.conftest import ROOT


def test_equal_or_inverted_competitors_are_refused():
    with pytest.raises(StageError, match="same size"):
        check_competitor_sizes({"large": 1000, "small": 1000})
    with pytest.raises(StageError, match="smaller than `small`.*swap them"):
        check_competitor_sizes({"large": 10, "small": 1000})
    check_competitor_sizes({"large": 1000, "small": 10})


def test_fingerprints_change_downstream_only():
    base = load_config(ROOT / "configs" / "tiny.yaml")
    changed = load_config(ROOT / "configs" / "tiny.yaml", ["train.beta=0.3"])
    a, b = stage_fingerprints(base), stage_fingerprints(changed)
    split = STAGE_NAMES.index("train")
    assert all(a[s] == b[s] for s in STAGE_NAMES[:split])
    assert all(a[s] != b[s] for s in STAGE_NAMES[split:])
