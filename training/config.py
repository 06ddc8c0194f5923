"""Training's config: method, loss settings, optimizer and step budget, reference model, scale
(Ray Train + DeepSpeed), checkpoints and metrics; composed into the run config as `train`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lossaverse.pipeline.config import Strict
from lossaverse.training.methods import get_method
from lossaverse.training.zero import deepspeed_config, deepspeed_conflicts


class LoraSettings(Strict):
    """LoRA adapters (peft): only they are trained; the reference is the base with adapters off."""

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class OnPolicyConfig(Strict):
    """How the SFT'd target answers fresh train items in `recipe: sft_then_kto`."""

    samples: int = Field(default=4, ge=1)  # answers per item: right and wrong ones to the same prompt
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    # Items: this many fresh train items from a block of the train split that no round answers
    # (after the validation items and the `rounds.count` rounds' blocks); None: benchmark.n_train.
    items: int | None = Field(default=None, ge=1)


# Baselines of the recipe that train an existing method from the recipe's SFT checkpoint:
# name -> the method trained (lossaverse.training.methods.METHODS).
RECIPE_BASELINES = {"rft": "sft"}


# Marks a TrainConfig field that only the recipe's KTO step reads (its loss), not its SFT step, the
# on-policy answers or the RFT baseline: changing one re-runs the KTO step alone (kto_step_fields).
KTO_STEP = {"step": "kto"}


class TrainConfig(Strict):
    """Training: method, loss settings, optimizer and step budget (shared by every method), reference
    model, scale (Ray Train + DeepSpeed), checkpoints and metrics. See training/ for the code."""

    method: str = "kto"  # a key of lossaverse.training.methods.METHODS: kto | dpo | sft
    # `single`: `method` alone. `sft_then_kto`: SFT on the desirable rows for `sft_steps`, the SFT'd
    # target answers fresh train items (`on_policy`, graded by the same marker), then KTO from the
    # SFT checkpoint (its reference is the SFT model) on those answers plus the competitors' for
    # `max_steps`. Compared methods get the recipe's whole budget (sft_steps + max_steps).
    recipe: Literal["single", "sft_then_kto"] = "single"
    sft_steps: int = Field(default=256, ge=1)
    # The recipe's SFT run also exports its model after each of these steps (recipe/sft_curve/
    # step-<k>/): with the recipe's start (sft_steps) and, when sft is compared, the SFT baseline at
    # the whole budget, they are the points of SFT's validation curve, which `lossaverse tune`
    # scores to show where SFT stops gaining (the step the recipe's KTO should start from). Without
    # the recipe there is no such run, and it does nothing.
    sft_curve: list[int] = Field(default_factory=list)
    on_policy: OnPolicyConfig = OnPolicyConfig()
    # KTO plus nll_weight x the SFT loss of its desirable rows (training/kto_nll.py); 0: plain KTO.
    nll_weight: float = Field(default=0.0, ge=0, json_schema_extra=KTO_STEP)
    # The recipe's KTO step: which wrong answers it learns from (every right answer is kept, so RFT
    # stays "the KTO step's rows without its wrong ones"). `all`: the competitors' and the SFT'd
    # target's own; `on_policy`: the target's own only (another model's wrong answers are ones the
    # target already finds unlikely, and pushing them down drains probability from every answer:
    # Ren & Sutherland 2024); `mixed`: the target's own, on items it also answered right at least
    # once (a right and a wrong answer to the same prompt). training/methods.py kto_rows.
    negatives: Literal["all", "on_policy", "mixed"] = Field(default="all", json_schema_extra=KTO_STEP)
    # Baselines trained beside `method` on the same round's data with the same step budget, each
    # evaluated against the untrained target (`lossaverse run --compare kto,dpo,sft`). With the
    # recipe, `rft` is rejection-sampling fine-tuning (RFT, Yuan et al. 2023; STaR): SFT from the
    # recipe's SFT checkpoint on the desirable rows of the KTO step's data (the competitors' and the
    # on-policy right answers) for the KTO step's max_steps: the recipe without its wrong answers.
    compare: list[str] = Field(default_factory=list)
    beta: float = Field(default=0.1, gt=0, json_schema_extra=KTO_STEP)  # KTO / DPO: strength of the implicit KL penalty
    # KTO's lambda_D / lambda_U. `fixed`: as given (or undesirable = loss_aversion * desirable);
    # `auto`: from datasets/stats.json so that lambda_D*n_D/(lambda_U*n_U) is in [1, 4/3].
    weights: Literal["fixed", "auto"] = Field(default="fixed", json_schema_extra=KTO_STEP)
    desirable_weight: float = Field(default=1.0, gt=0, json_schema_extra=KTO_STEP)
    undesirable_weight: float = Field(default=1.0, gt=0, json_schema_extra=KTO_STEP)
    loss_aversion: float | None = Field(default=None, gt=0, json_schema_extra=KTO_STEP)  # lambda_U / lambda_D
    # Optimizer and budget: the same for every method, so baselines compare like for like.
    learning_rate: float = Field(default=5e-5, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)  # overrides epochs when set
    # KTO's KL reference point pairs each prompt with another completion of the same micro-batch.
    per_device_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=256, ge=8)
    gradient_checkpointing: bool = False  # memory: recompute activations in the backward pass
    # Reference model: a frozen copy (default), log-probs computed once before training (no copy in
    # memory), or with `lora` the base model with the adapters switched off.
    precompute_ref_log_probs: bool = Field(default=False, json_schema_extra=KTO_STEP)
    lora: LoraSettings | None = None
    # Scale: one Ray Train worker per GPU (or CPU slot); DeepSpeed ZeRO by name or a JSON file.
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    # Compute precision. Unset: bf16 on GPU, fp32 on CPU. true on a CPU with AMX or AVX512-BF16 runs
    # the matmuls in bf16 too; DeepSpeed keeps fp32 master weights either way (without DeepSpeed, torch
    # autocast with fp32 weights).
    bf16: bool | None = None
    gpus_per_worker: float = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # SPREAD: over nodes
    deepspeed: str = "zero2"  # zero2 | zero3 | zero3_offload | none (DDP) | path/to/config.json
    memory_per_worker_gib: float | None = Field(default=None, gt=0)  # memory: checked before training
    # Checkpoints (Ray Train storage under the run directory) and recovery from failed workers.
    checkpoint_every: int = Field(default=50, ge=0)  # steps; 0 = none
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=-1)  # worker-group restarts from the last checkpoint
    # Seconds Ray Train waits for a (re)started worker group's placement before one failed try
    # (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; None: that variable, else Ray's 60 s). Not part of
    # the fingerprint: it changes how long a lost node is waited for, not what is trained.
    start_timeout_s: float | None = Field(default=None, gt=0, exclude=True)
    resume: bool = Field(default=False, exclude=True)  # set by `lossaverse train --resume`
    # Metrics: every `logging_steps` to the console, manifest.json and, if asked, TensorBoard.
    logging_steps: int = Field(default=1, ge=1)
    report_to: list[Literal["tensorboard"]] = Field(default_factory=list)

    @field_validator("method")
    @classmethod
    def _method_known(cls, value: str) -> str:
        get_method(value)
        return value

    @field_validator("compare")
    @classmethod
    def _compare_known(cls, value: list[str]) -> list[str]:
        for method in value:
            if method not in RECIPE_BASELINES:
                get_method(method)
        if len(set(value)) != len(value):
            raise ValueError(f"compare lists a method twice: {value}")
        return value

    @property
    def methods(self) -> list[str]:
        """`method` first (its model is the run's `model/`), then the other compared methods."""
        return [self.method] + [m for m in self.compare if m != self.method]

    @property
    def bf16_on(self) -> bool:
        """Whether training computes in bf16: train.bf16 where set, else on GPU only."""
        return self.use_gpu if self.bf16 is None else self.bf16

    def for_method(self, method: str) -> "TrainConfig":
        """These settings with `method` trained (optimizer, budget and scale shared)."""
        return self.model_copy(update={"method": method, "compare": []})

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_known(cls, value: str) -> str:
        deepspeed_config(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if "rft" in self.compare and self.recipe != "sft_then_kto":
            raise ValueError("train.compare rft starts from the recipe's SFT checkpoint and trains on its on-policy "
                             "right answers: set train.recipe: sft_then_kto, or drop rft from train.compare")
        if self.negatives != "all" and self.recipe != "sft_then_kto":
            raise ValueError(f"train.negatives {self.negatives!r} keeps the SFT'd target's own wrong answers, which only "
                             "recipe sft_then_kto has: set train.recipe: sft_then_kto, or train.negatives: all")
        if self.recipe == "sft_then_kto":
            if self.method != "kto":
                raise ValueError(f"recipe sft_then_kto trains KTO after SFT; set train.method: kto (not {self.method!r})")
            if self.max_steps is None:
                raise ValueError("recipe sft_then_kto needs train.max_steps (the KTO steps after the sft_steps of SFT), "
                                 "so that compared methods get the same total budget")
            run = self.sft_steps + (self.max_steps if "sft" in self.compare else 0)  # the SFT run's steps
            wrong = [k for k in self.sft_curve if not 0 < k < run or k == self.sft_steps]
            if wrong or len(set(self.sft_curve)) != len(self.sft_curve):
                raise ValueError(f"train.sft_curve {self.sft_curve}: each step once, inside the SFT run's {run} steps and "
                                 f"other than sft_steps ({self.sft_steps}, the recipe's start, always exported)")
        if "kto" in self.methods and self.per_device_batch_size < 2:
            raise ValueError(
                "KTO needs a per-device batch of at least 2 (its KL reference point pairs each "
                "prompt with another completion in the micro-batch); set train.per_device_batch_size >= 2"
            )
        explicit = self.model_fields_set & {"desirable_weight", "undesirable_weight"}
        if self.weights == "auto" and explicit:
            raise ValueError(f"weights: auto sets desirable_weight and undesirable_weight from the data; remove {sorted(explicit)} or use weights: fixed")
        if self.weights == "fixed" and self.loss_aversion is not None and "undesirable_weight" in explicit:
            raise ValueError("set loss_aversion (undesirable = loss_aversion x desirable_weight) or undesirable_weight, not both")
        if self.bf16 is False and self.use_gpu:
            raise ValueError("train.bf16: false with train.use_gpu: GPU training runs bf16; leave train.bf16 unset")
        if self.use_gpu and self.deepspeed == "none":
            raise ValueError(
                "train.deepspeed: none with train.use_gpu trains bf16 weights with no fp32 master copy, so at small "
                "learning rates most AdamW updates round to zero; use deepspeed: zero2 (DeepSpeed keeps fp32 master "
                "weights) or train on CPU (fp32)"
            )
        ds = deepspeed_config(self.deepspeed)
        if ds is not None:
            conflicts = deepspeed_conflicts(
                ds, micro_batch=self.per_device_batch_size, grad_accum=self.gradient_accumulation_steps,
                workers=self.num_workers, use_gpu=self.use_gpu, bf16=self.bf16_on, learning_rate=self.learning_rate,
                max_grad_norm=self.max_grad_norm,
            )
            if conflicts:
                raise ValueError(f"DeepSpeed config {self.deepspeed!r} contradicts the trainer: " + "; ".join(conflicts))
        return self


def kto_step_fields() -> frozenset[str]:
    """The TrainConfig fields marked KTO_STEP: the recipe's KTO step's own settings."""
    return frozenset(name for name, f in TrainConfig.model_fields.items() if f.json_schema_extra == KTO_STEP)
