"""DeepSpeed ZeRO configs (shipped as JSON in training/deepspeed/) and the memory they plan for.

`deepspeed_config(name)` picks a shipped config by name (`zero2`, `zero3`, `zero3_offload`), reads a
user's JSON file by path, or returns None for `none` (plain DDP). `deepspeed_conflicts` lists the
values in such a config that contradict the trainer's settings; `model_state_gib` estimates the
memory per worker that the model states need.
"""

from __future__ import annotations

import json
from pathlib import Path

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"
NO_DEEPSPEED = "none"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")) + [NO_DEEPSPEED]


def deepspeed_config(name: str) -> dict | None:
    """A shipped config by name, a JSON file by path (ending in .json), or None for `none`."""
    if name == NO_DEEPSPEED:
        return None
    path = Path(name).expanduser() if name.endswith(".json") else DEEPSPEED_DIR / f"{name}.json"
    if not path.is_file():
        if name.endswith(".json"):
            raise ValueError(f"DeepSpeed config file not found: {name}")
        raise ValueError(f"unknown DeepSpeed config {name!r}; valid: {shipped_configs()} or a path to a .json file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({exc})") from None


def zero_stage(ds: dict | None) -> int:
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def offloads(ds: dict | None) -> tuple[bool, bool]:
    """(optimizer states offloaded, parameters offloaded) to CPU or NVMe."""
    zero = (ds or {}).get("zero_optimization", {})

    def on(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") not in ("none", None)

    return on("offload_optimizer"), on("offload_param")


def _fixed(value) -> bool:
    return value is not None and value != "auto"


def deepspeed_conflicts(ds: dict, *, micro_batch: int, grad_accum: int, workers: int, use_gpu: bool,
                        bf16: bool, learning_rate: float, max_grad_norm: float) -> list[str]:
    """Values in a DeepSpeed config that contradict the trainer's settings, each with its fix.

    `"auto"` values are filled in by the trainer and never conflict. The trainer runs bf16 or fp32
    (`train.bf16`, unset: bf16 on GPU, fp32 on CPU), so fp16 never fits, and a fixed bf16 must match.
    """
    out = []
    checks = [
        ("train_micro_batch_size_per_gpu", micro_batch, "train.per_device_batch_size"),
        ("gradient_accumulation_steps", grad_accum, "train.gradient_accumulation_steps"),
        ("train_batch_size", micro_batch * grad_accum * workers, "per_device_batch_size x gradient_accumulation_steps x num_workers"),
        ("gradient_clipping", max_grad_norm, "train.max_grad_norm"),
    ]
    for key, want, field in checks:
        if _fixed(ds.get(key)) and ds[key] != want:
            out.append(f"{key}={ds[key]} but the trainer uses {want} ({field}); set it to \"auto\" or to {want}")
    lr = ds.get("optimizer", {}).get("params", {}).get("lr")
    if _fixed(lr) and float(lr) != learning_rate:
        out.append(f"optimizer.params.lr={lr} but train.learning_rate={learning_rate}; set it to \"auto\"")
    if ds.get("fp16", {}).get("enabled") is True:
        out.append("fp16.enabled=true, but training runs bf16 or fp32 (train.bf16); remove fp16 or set it to false")
    fixed = ds.get("bf16", {}).get("enabled")
    if fixed is True and not bf16:
        out.append("bf16.enabled=true but training runs fp32 (CPU, train.bf16 unset or false); set bf16.enabled to \"auto\"")
    if fixed is False and bf16:
        out.append("bf16.enabled=false but training runs bf16 (GPU, or train.bf16: true); set bf16.enabled to \"auto\"")
    if not use_gpu and any(offloads(ds)):
        out.append("offload_optimizer/offload_param move states from GPU to CPU, but train.use_gpu=false; "
                   "use deepspeed: zero3 (or zero2) on CPU")
    return out


def model_state_gib(params: int, *, stage: int, workers: int, offload_optimizer: bool, offload_params: bool,
                    bf16: bool, trainable: int | None = None, reference_copy: bool = True) -> float:
    """Memory per worker for the model states (weights, gradients, Adam states, reference model).

    ZeRO (Rajbhandari et al., 2020, Sec. 3 and Fig. 1) with mixed-precision Adam: K = 12 bytes of
    optimizer state per trainable parameter (fp32 master weights, momentum, variance), 2 bytes of bf16
    weights and 2 of bf16 gradients; in fp32 (CPU) training weights and gradients are 4 bytes each and
    Adam keeps 8. Stage 1 shards the optimizer states over the N workers, stage 2 also the gradients,
    stage 3 also the weights; offloaded states live in host memory and are not counted. A frozen
    reference model (KTO, DPO without precomputed log-probs or LoRA) adds one more copy of the weights,
    sharded like them under stage 3. Activations come on top, so this is a lower bound.
    """
    trainable = params if trainable is None else trainable
    w_bytes, g_bytes, k_bytes = (2, 2, 12) if bf16 else (4, 4, 8)
    n = max(workers, 1)
    weights = params * w_bytes / (n if stage >= 3 else 1)
    grads = trainable * g_bytes / (n if stage >= 2 else 1)
    optim = trainable * k_bytes / (n if stage >= 1 else 1)
    if offload_optimizer:
        optim = 0.0
    if offload_params and stage >= 3:
        weights = 0.0
    reference = (params * w_bytes / (n if stage >= 3 else 1)) if reference_copy else 0.0
    if offload_params and stage >= 3:
        reference = 0.0
    return (weights + grads + optim + reference) / 2**30
