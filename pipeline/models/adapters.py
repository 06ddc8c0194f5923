"""Trained models as LoRA adapters of their base, for one engine to serve them all.

A LoRA-trained model is exported merged, with its adapters beside the weights in `<model>/adapter/`
(peft's format; `lossaverse.training.export`). A model trained from another trained model (the
recipe's KTO step starts from its SFT step's merged model) has a chain of adapters back to the
pretrained base: `lora_chain` follows it, and `stack_adapters` writes the chain as one adapter.

Stacking is exact arithmetic, not an approximation: adapter i adds s_i * B_i @ A_i to a weight
(s_i = lora_alpha_i / r_i), and the sum of those is B @ A with A the A_i stacked along the rank and
B the s_i * B_i side by side; written with lora_alpha = r its scale is 1. peft has no such
function (its `add_weighted_adapter` with `cat` combines adapters of one model in memory, not a
chain of exported ones), so it is written here, on the safetensors files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ADAPTER = "adapter"  # the adapters' folder inside an exported model (lossaverse.training.export writes it)
# vLLM's accepted max_lora_rank values (vllm.config.lora.MaxLoRARanks, 0.32).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Chain:
    """A trained model as its pretrained base plus adapters, oldest first."""

    base: str
    adapters: tuple[Path, ...]

    @property
    def rank(self) -> int:
        return sum(adapter_config(a)["r"] for a in self.adapters)


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def lora_chain(model_dir: str | Path) -> Chain | None:
    """The base and adapters behind an exported model, or None when it was not trained with LoRA.
    Each adapter's `base_model_name_or_path` is the model it was trained on; the chain goes back
    until a model without adapters of its own (the pretrained base)."""
    adapters: list[Path] = []
    current = Path(model_dir)
    while (current / ADAPTER / "adapter_config.json").is_file():
        adapter = current / ADAPTER
        if adapter in adapters or len(adapters) > 16:
            raise ValueError(f"{model_dir}: its adapters' base models loop ({adapter})")
        adapters.insert(0, adapter)
        current = Path(adapter_config(adapter)["base_model_name_or_path"])
    return Chain(str(current), tuple(adapters)) if adapters else None


def unstackable(adapters: tuple[Path, ...]) -> str | None:
    """Why these adapters cannot be written as one (None when they can)."""
    configs = [adapter_config(a) for a in adapters]
    for a, c in zip(adapters, configs):
        for key in ("use_dora", "use_rslora"):
            if c.get(key):
                return f"{a} uses {key}"
        if c.get("rank_pattern") or c.get("alpha_pattern"):
            return f"{a} has per-module ranks"
    targets = {json.dumps(sorted(c["target_modules"]) if isinstance(c["target_modules"], list) else c["target_modules"]) for c in configs}
    if len(targets) > 1:
        return f"the adapters target different modules ({', '.join(sorted(targets))})"
    return None


def stack_adapters(adapters: tuple[Path, ...], out: Path) -> Path:
    """One peft adapter in `out` equal to applying `adapters` one after another (module docstring);
    a single adapter is returned as it is."""
    import torch  # deferred: torch loads in seconds
    from safetensors.torch import load_file, save_file  # deferred: safetensors loads in seconds

    if len(adapters) == 1:
        return adapters[0]
    if (why := unstackable(adapters)) is not None:
        raise ValueError(f"cannot stack the adapters: {why}")
    configs = [adapter_config(a) for a in adapters]
    weights = [load_file(str(Path(a) / "adapter_model.safetensors")) for a in adapters]
    keys = sorted({k for w in weights for k in w if ".lora_A." in k})
    stacked = {}
    for key_a in keys:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        parts = [(w[key_a], w[key_b] * (c["lora_alpha"] / c["r"])) for w, c in zip(weights, configs) if key_a in w]
        stacked[key_a] = torch.cat([a for a, _ in parts], dim=0).contiguous()
        stacked[key_b] = torch.cat([b for _, b in parts], dim=1).contiguous()
    rank = sum(c["r"] for c in configs)
    out.mkdir(parents=True, exist_ok=True)
    save_file(stacked, str(out / "adapter_model.safetensors"))
    config = {**configs[0], "r": rank, "lora_alpha": rank, "base_model_name_or_path": configs[0]["base_model_name_or_path"]}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def zero_adapter(like: Path, out: Path) -> Path:
    """An adapter with the modules and shapes of `like` that changes nothing (its B is zero): the
    untrained base as a LoRA request of its own.

    vLLM 0.32's CPU LoRA kernels (vllm/lora/ops/torch_ops) pick each token's adapter weights by its
    slot index, and a request without an adapter has slot -1, which in torch indexing is the last
    slot: in a batch that mixes them, the base's answers came out with an adapter applied
    (tests/integration/test_lora_engine.py). Given a zero adapter of its own, no request has slot -1."""
    import torch  # deferred: torch loads in seconds
    from safetensors.torch import load_file, save_file  # deferred: safetensors loads in seconds

    weights = load_file(str(Path(like) / "adapter_model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(like), indent=2))
    return out


def vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")
