"""The tiny models are reproducible on one machine: the same seed builds byte-identical files twice.

Across machines they are not: the build's floating-point order follows the CPU (its thread count and
vector width), so another machine builds other weights from the same seed (README "Reproducibility").
The build here is the real one (tokenizer, Llama init, training loop, save) cut to a few steps on a tenth of the corpus."""

import pytest

from lossaverse.pipeline.models import tinymodels

SHORT = {**tinymodels.TINY_SIZES["small"], "steps": 30}


@pytest.fixture
def short_small(monkeypatch):
    monkeypatch.setitem(tinymodels.TINY_SIZES, "small", SHORT)
    monkeypatch.setattr(tinymodels, "PRETRAIN_ROWS", 2000)


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_the_same_seed_builds_byte_identical_tiny_models(tmp_path, short_small):
    first = _files(tinymodels.build_tiny("small", tmp_path / "a"))
    second = _files(tinymodels.build_tiny("small", tmp_path / "b"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(first)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_builds_other_weights(tmp_path, short_small, monkeypatch):
    """The comparison above can fail: the weights follow the seed."""
    first = _files(tinymodels.build_tiny("small", tmp_path / "a"))
    monkeypatch.setattr(tinymodels, "PRETRAIN_SEED", tinymodels.PRETRAIN_SEED + 1)
    other = _files(tinymodels.build_tiny("small", tmp_path / "b"))
    assert first["model.safetensors"] != other["model.safetensors"]
