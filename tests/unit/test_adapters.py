"""Trained models as LoRA adapters of their base: the chain back to the pretrained base, and a chain
stacked into one adapter whose weight change is the sum of the chain's (worked by hand)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lossaverse.pipeline.models.adapters import lora_chain, stack_adapters, unstackable, vllm_rank

KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def write_adapter(model_dir, base, a, b, alpha, targets=("q_proj",)):
    folder = model_dir / "adapter"
    folder.mkdir(parents=True)
    save_file({f"{KEY}.lora_A.weight": a, f"{KEY}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    config = {"r": a.shape[0], "lora_alpha": alpha, "target_modules": list(targets), "base_model_name_or_path": str(base),
              "peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def delta(folder):
    w, c = load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "adapter_config.json").read_text())
    return (c["lora_alpha"] / c["r"]) * w[f"{KEY}.lora_B.weight"] @ w[f"{KEY}.lora_A.weight"]


def test_a_chain_stacks_into_one_adapter_whose_change_is_the_sum(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    # first: rank 1, alpha 2 (scale 2): 2 * [[1], [0]] @ [[1, 2]] = [[2, 4], [0, 0]]
    first = write_adapter(tmp_path / "sft", base, torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]]), alpha=2)
    # second, trained on first's merged model: rank 1, alpha 1: [[0], [3]] @ [[1, 1]] = [[0, 0], [3, 3]]
    second = write_adapter(tmp_path / "kto", tmp_path / "sft", torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0], [3.0]]), alpha=1)
    chain = lora_chain(tmp_path / "kto")
    assert chain.base == str(base) and chain.adapters == (first, second) and chain.rank == 2
    assert lora_chain(base) is None  # no adapters of its own: the pretrained base
    out = stack_adapters(chain.adapters, tmp_path / "stacked")
    assert torch.equal(delta(out), torch.tensor([[2.0, 4.0], [3.0, 3.0]]))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["base_model_name_or_path"] == str(base)
    assert stack_adapters((first,), tmp_path / "one") == first  # a single adapter is used as it is


def test_adapters_that_cannot_stack_say_why(tmp_path):
    first = write_adapter(tmp_path / "a", tmp_path, torch.ones(1, 2), torch.ones(2, 1), alpha=1)
    second = write_adapter(tmp_path / "b", tmp_path / "a", torch.ones(1, 2), torch.ones(2, 1), alpha=1, targets=("v_proj",))
    assert "different modules" in unstackable((first, second))
    with pytest.raises(ValueError, match="cannot stack the adapters: the adapters target different modules"):
        stack_adapters((first, second), tmp_path / "out")


def test_vllm_rank_is_the_smallest_accepted_size_that_holds_the_rank():
    assert [vllm_rank(r) for r in (1, 2, 16, 17, 32, 33)] == [1, 8, 16, 32, 32, 64]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        vllm_rank(513)
