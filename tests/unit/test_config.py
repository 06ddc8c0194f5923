from pathlib import Path

import pytest

from lossaverse.cluster.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert set(cfg.competitors) == {"large", "small"}


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = "name: t\ncompetitors: {large: {path: 'tiny:large'}, small: {path: 'tiny:small'}}\ntarget: {path: 'tiny:small'}\n"


def test_unknown_key_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"generate\.sampling\.temprature: Extra inputs"):
        load_config(_write(tmp_path, BASE + "generate: {sampling: {temprature: 0.5}}\n"))


def test_override_is_applied_and_typed(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["generate.sampling.samples=5", "train.beta=0.2"])
    assert cfg.generate.sampling.samples == 5 and cfg.train.beta == 0.2


def test_override_with_bad_value_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"generate\.sampling\.samples"):
        load_config(_write(tmp_path, BASE), ["generate.sampling.samples=zero"])


def test_override_needs_key_value(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(_write(tmp_path, BASE), ["generate.sampling.samples"])


def test_missing_model_path_is_named(tmp_path):
    text = BASE.replace("target: {path: 'tiny:small'}", "target: {path: './no/such/model'}")
    with pytest.raises(ConfigError, match=r"target\.path: model path './no/such/model' does not exist"):
        load_config(_write(tmp_path, text))


def test_kto_micro_batch_of_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="per_device_batch_size >= 2"):
        load_config(_write(tmp_path, BASE), ["train.per_device_batch_size=1"])


def test_both_competitors_required(tmp_path):
    text = BASE.replace("large: {path: 'tiny:large'}, ", "")
    with pytest.raises(ConfigError, match=r"missing \['large'\]"):
        load_config(_write(tmp_path, text))


def test_unknown_benchmark_source_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown benchmark source 'csv'; valid: \['huggingface', 'jsonl', 'parquet', 'synthetic'\]"):
        load_config(_write(tmp_path, BASE + "benchmark: {source: csv, path: x}\n"))


def test_missing_benchmark_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="benchmark file for split 'train' not found: /nope.jsonl"):
        load_config(_write(tmp_path, BASE + "benchmark: {source: jsonl, path: x, splits: {train: /nope.jsonl, eval: /nope.jsonl}}\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_each_model_has_its_own_prompt_style_over_generates():
    from lossaverse.cluster.config import RunConfig

    cfg = RunConfig.model_validate({
        "name": "styles",
        "generate": {"system_prompt": "Be exact.", "few_shot": [{"question": "1 + 1?", "answer": "2"}]},
        "competitors": {"large": {"path": "tiny:large", "few_shot": [{"question": "2 + 2?", "answer": "4"}]},
                        "small": {"path": "tiny:small", "few_shot": []}},
        "target": {"path": "tiny:small", "system_prompt": "Think."},
    })
    assert cfg.style_for(cfg.competitors["large"])["few_shot"] == (("2 + 2?", "4"),)
    assert cfg.style_for(cfg.competitors["large"])["system_prompt"] == "Be exact."
    assert cfg.style_for(cfg.competitors["small"])["few_shot"] == ()  # an empty list is its own: zero-shot
    assert cfg.style_for(cfg.target) == {"template": None, "system_prompt": "Think.", "few_shot": (("1 + 1?", "2"),)}
    assert cfg.style_for() == {"template": None, "system_prompt": "Be exact.", "few_shot": (("1 + 1?", "2"),)}
