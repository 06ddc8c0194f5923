"""The training methods, one registry: KTO and the baselines the KTO paper compares with.

Each method names the dataset it reads (under datasets/), the rows it learns from, and the TRL
trainer and config that run it. Every method gets the same model, optimizer settings and step
budget from `train:`; only `method_args` differ.

- kto: TRL `KTOTrainer` on datasets/kto (prompt, completion, label), unpaired binary feedback,
  through `lossaverse.training.kto_nll.KTONLLTrainer` (TRL's loss plus `train.nll_weight` x the SFT loss of
  the desirable rows; with 0, TRL's loss unchanged).
- dpo: TRL `DPOTrainer` on datasets/pairs (prompt, chosen, rejected), same prompt, one right and one
  wrong answer (Rafailov et al., 2023).
- sft: TRL `SFTTrainer` on the correct answers of datasets/kto (prompt, completion), loss on the
  completion tokens only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from lossaverse.pipeline.data.schemas import KTO, ON_POLICY, PAIRS
from lossaverse.training.lmhead import score_labelled_positions_only


@dataclass(frozen=True)
class Method:
    name: str
    dataset: str  # folder under datasets/
    schema: pa.Schema  # its row contract
    columns: tuple[str, ...]  # the columns the TRL trainer reads
    trl: tuple[str, str]  # (config class, trainer class) in `trl`, or "module:Class" for our own
    uses_reference: bool  # a frozen reference policy (KTO, DPO) or none (SFT)
    min_per_device_batch: int
    rows: Callable[[pa.Table], pa.Table]  # the rows this method learns from
    empty_hint: str  # what to do when there are none
    trainer_kwargs: Callable[[dict], dict] = lambda train: {}  # the trainer's own arguments, from `train:`

    def select(self, table: pa.Table) -> pa.Table:
        return self.rows(table).select(list(self.columns))

    def trainer(self, model, args: dict, method_args: dict, train_dataset, tokenizer, callbacks, peft_config, *,
                train: dict):
        """Build the TRL trainer: `args` are the shared TrainingArguments, `method_args` this method's
        config fields, `train` the whole `train:` config (TrainConfig dumped) its own arguments come from."""
        config_cls, trainer_cls = (_resolve(name) for name in self.trl)
        if not train["use_gpu"]:
            score_labelled_positions_only()  # the prompt's positions never reach the LM head's tiles
        return trainer_cls(
            model=model,
            args=config_cls(**args, **method_args),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            peft_config=peft_config,
            **self.trainer_kwargs(train),
        )


def _resolve(name: str):
    """A class of `trl` by name, or ours as "module:Class"."""
    module, _, cls = name.rpartition(":")
    return getattr(importlib.import_module(module or "trl"), cls)


def _all(table: pa.Table) -> pa.Table:
    return table


def _correct_only(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["label"], True))


def kto_rows(table: pa.Table, negatives: str) -> pa.Table:
    """The rows of datasets/kto (KTO schema) the KTO step learns from under `train.negatives`: every
    desirable row, and the undesirable rows of `all` competitors, of the SFT'd target alone
    (`on_policy`: competitor ON_POLICY), or of the target on the items where one of its own answers
    is desirable too (`mixed`). Row order is kept."""
    if negatives == "all":
        return table
    right = pc.equal(table["label"], True)
    own = pc.equal(table["competitor"], ON_POLICY)
    keep = pc.and_(pc.invert(right), own)
    if negatives == "mixed":
        solved = table.filter(pc.and_(right, own))["id"].unique()
        keep = pc.and_(keep, pc.is_in(table["id"], value_set=solved))
    elif negatives != "on_policy":
        raise ValueError(f"unknown train.negatives {negatives!r}; valid: ['all', 'mixed', 'on_policy']")
    return table.filter(pc.or_(right, keep))


METHODS: dict[str, Method] = {
    "kto": Method(
        "kto", "kto", KTO, ("prompt", "completion", "label"), ("KTOConfig", "lossaverse.training.kto_nll:KTONLLTrainer"), True, 2,
        _all, "datasets/kto is empty: mark some answers first (`lossaverse mark`)",
        lambda train: {"nll_weight": train["nll_weight"]},  # train: the whole TrainConfig, dumped
    ),
    "dpo": Method(
        "dpo", "pairs", PAIRS, ("prompt", "chosen", "rejected"), ("DPOConfig", "DPOTrainer"), True, 1, _all,
        "DPO needs pairs (an item with one right and one wrong answer) and datasets/pairs has none: "
        "use method: kto, which learns from unpaired labels, or generate more samples per prompt",
    ),
    "sft": Method(
        "sft", "kto", KTO, ("prompt", "completion"), ("SFTConfig", "SFTTrainer"), False, 1, _correct_only,
        "SFT learns from correct answers and datasets/kto has none: use method: kto, which also "
        "learns from wrong answers alone",
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name]


def peft_config(lora: dict | None):
    """`train.lora` (r, alpha, dropout, target_modules) as a peft.LoraConfig; None without LoRA.

    With LoRA the trainers keep no separate reference model: the reference is the base model with
    the adapters switched off.
    """
    if lora is None:
        return None
    from peft import LoraConfig  # deferred: peft loads in seconds

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


def method_args(name: str, train: dict) -> dict:
    """The method's own TRL config fields, from the resolved `train:` config dumped (KTO's weights as
    the plan resolved them, lossaverse.training.validate.TrainPlan.train); everything else is shared."""
    if name == "kto":
        return {key: train[key] for key in ("beta", "desirable_weight", "undesirable_weight", "precompute_ref_log_probs")}
    if name == "dpo":
        return {key: train[key] for key in ("beta", "precompute_ref_log_probs")}
    return {}
