"""Checks that run before any training worker starts: the data fits the method, the model fits the memory.

`plan_training` reads the method's dataset, applies every check and returns a `TrainPlan` with the
rows to train on and the resolved settings. Each failure is a `ConfigError` that says what is wrong
and how to fix it (the CLI prints it as one line and exits 2). The checks that need only the config
(a micro-batch of 1 for KTO, a DeepSpeed file that contradicts the trainer) are `TrainConfig`
validators, so they fail as soon as the config is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lossaverse.pipeline.config import ConfigError
from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.models.tinymodels import meta_model, parameter_count
from lossaverse.training.config import TrainConfig
from lossaverse.training.kto import kto_weights
from lossaverse.training.methods import get_method, kto_rows, method_args, peft_config
from lossaverse.training.zero import deepspeed_config, model_state_gib, offloads, zero_stage


@dataclass
class TrainPlan:
    method: str
    table: pa.Table  # the rows to train on, the method's columns only
    train: TrainConfig  # the config as trained: KTO's weights resolved from the data
    info: dict = field(default_factory=dict)  # resolved settings and counts, for the manifest

    @property
    def method_args(self) -> dict:
        """The method's own TRL config fields."""
        return method_args(self.method, self.train.model_dump(mode="json"))


def parameter_counts(model_path: str, lora: dict | None = None) -> tuple[int, int]:
    """(all parameters, trainable parameters) of a model, built on the meta device (no weights read)."""
    model = meta_model(model_path)
    total = parameter_count(model)
    if lora is None:
        return total, total
    from peft import get_peft_model  # deferred: peft loads in seconds

    return total, parameter_count(get_peft_model(model, peft_config(lora)), trainable_only=True)


def label_counts(stats_path: Path | None, table: pa.Table) -> tuple[int, int]:
    """(n_desirable, n_undesirable): from datasets/stats.json, else counted in the table."""
    if stats_path is not None and stats_path.is_file():
        labels = json.loads(stats_path.read_text())["labels"]
        return int(labels["desirable"]), int(labels["undesirable"])
    n_d = int(pc.sum(table["label"]).as_py() or 0)
    return n_d, table.num_rows - n_d


def check_rows(method: str, rows: int, train) -> None:
    if rows == 0:
        raise ConfigError(get_method(method).empty_hint)
    world = train.num_workers * train.per_device_batch_size
    if rows < world:
        raise ConfigError(
            f"{rows} training rows for method {method}, fewer than one global batch "
            f"(num_workers {train.num_workers} x per_device_batch_size {train.per_device_batch_size} = {world}); "
            "lower train.num_workers or train.per_device_batch_size, or build more data"
        )


def check_memory(params: int, trainable: int, train, uses_reference: bool) -> float:
    """The planned memory per worker in GiB (model states only); ConfigError when over the budget."""
    ds = deepspeed_config(train.deepspeed)
    stage = zero_stage(ds)
    off_opt, off_param = offloads(ds)
    reference = uses_reference and not train.precompute_ref_log_probs and train.lora is None
    need = model_state_gib(params, stage=stage, workers=train.num_workers, offload_optimizer=off_opt,
                           offload_params=off_param, bf16=train.bf16_on and train.deepspeed != "none", trainable=trainable, reference_copy=reference)
    budget = train.memory_per_worker_gib
    if budget is not None and need > budget:
        fixes = []
        if stage < 3:
            fixes.append("deepspeed: zero3 (shards the weights over the workers)")
        if train.use_gpu and not off_opt:
            fixes.append("deepspeed: zero3_offload (optimizer states and weights in host memory)")
        if reference:
            fixes.append("precompute_ref_log_probs: true (no reference model in memory)")
        if train.lora is None:
            fixes.append("lora: {r: 16} (train adapters only)")
        fixes.append("more num_workers")
        raise ConfigError(
            f"the target ({params / 1e9:.2f}B parameters) needs about {need:.1f} GiB per worker for its weights, "
            f"gradients and optimizer states with deepspeed {train.deepspeed} over {train.num_workers} worker(s), "
            f"more than train.memory_per_worker_gib={budget}; use " + ", or ".join(fixes)
        )
    return need


def check_lengths(rows: pa.Table, tokenizer, max_length: int) -> dict:
    """What `max_length` does to these rows in TRL 1.16, which has no max_prompt_length or
    truncation_mode for KTO and DPO: a sequence longer than max_length is cut from the right (the
    prompt kept, the completion cut short), and a row whose prompt alone fills max_length is
    dropped without a word, so it would train on nothing. Such rows are refused here with the fix;
    the count of rows whose completion is cut is returned for the manifest.

    Tokens are counted as TRL counts them: prompt + completion tokenized together with the
    tokenizer's special tokens, plus one EOS unless the completion ends with it.
    """
    prompts = rows["prompt"].to_pylist()
    if "completion" in rows.column_names:
        completions = rows["completion"].to_pylist()
    else:  # DPO: the longer of the two answers
        completions = [max(c, r, key=len) for c, r in zip(rows["chosen"].to_pylist(), rows["rejected"].to_pylist())]
    fulls = [p + c for p, c in zip(prompts, completions)]
    # With the special tokens the tokenizer adds (a BOS for Llama-style ones), as TRL tokenizes.
    prompt_lens = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    eos = tokenizer.eos_token or ""
    full_lens = [len(ids) + (0 if eos and f.endswith(eos) else 1) for ids, f in zip(tokenizer(fulls)["input_ids"], fulls)]
    no_room = [i for i, n in enumerate(prompt_lens) if n >= max_length]
    if no_room:
        longest = max(prompt_lens)
        raise ConfigError(
            f"{len(no_room)} of {rows.num_rows} training rows have a prompt of train.max_length={max_length} tokens or more "
            f"(the longest: {longest}); TRL would drop them and train on nothing of theirs. Raise train.max_length above "
            f"{longest} or shorten the prompts (few-shot turns, system prompt)"
        )
    return {"max_length": max_length, "rows_cut_short": sum(n > max_length for n in full_lens),
            "longest_tokens": max(full_lens, default=0)}


def plan_training(train, datasets_dir: Path, params: tuple[int, int] | None, tokenizer=None) -> TrainPlan:
    """Read the method's dataset under `datasets_dir`, check it and resolve the settings.

    `params` is (all, trainable) parameters of the target, or None when unknown, which is refused
    only when `train.memory_per_worker_gib` asks for a memory check. With the target's `tokenizer`,
    rows that `train.max_length` would empty are refused (`check_lengths`).
    """
    method = get_method(train.method)
    path = Path(datasets_dir) / method.dataset
    if not path.is_dir():
        raise ConfigError(f"{path} is missing: run `lossaverse mark` (or `lossaverse run`) first")
    table = read_table(path, method.schema)
    info: dict = {"method": method.name}
    weights: dict = {}
    if method.name == "kto":
        table = kto_rows(table, train.negatives)
        # stats.json counts the dataset as built; with negatives left out, count what is trained on.
        stats = Path(datasets_dir) / "stats.json" if train.negatives == "all" else None
        n_d, n_u = label_counts(stats, table)
        try:
            w = kto_weights(train, n_d, n_u)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        info.update(desirable=n_d, undesirable=n_u, desirable_weight=round(w.desirable, 4),
                    undesirable_weight=round(w.undesirable, 4), loss_aversion=round(w.loss_aversion, 4),
                    weight_ratio=None if w.ratio is None else round(w.ratio, 4))
        weights = {"desirable_weight": w.desirable, "undesirable_weight": w.undesirable}
    rows = method.select(table)
    check_rows(method.name, rows.num_rows, train)
    info["rows"] = rows.num_rows
    if tokenizer is not None:
        info["lengths"] = check_lengths(rows, tokenizer, train.max_length)
    if params is None:
        if train.memory_per_worker_gib is not None:
            raise ConfigError("cannot count the target's parameters to plan memory (its config.json is not readable); "
                              "set target.params or unset train.memory_per_worker_gib")
    else:
        info["params"], info["trainable_params"] = params
        info["planned_gib_per_worker"] = round(check_memory(*params, train, method.uses_reference), 4)
    return TrainPlan(method.name, rows, train.model_copy(update=weights), info)


def target_parameters(model_path: str, train, declared: int | None = None) -> tuple[int, int] | None:
    """(all, trainable) parameters of the target, counted from its config; the declared count
    (`target.params`) when the config cannot be read; None when neither is known."""
    lora = train.lora.model_dump() if train.lora else None
    try:
        return parameter_counts(model_path, lora)
    except (OSError, ValueError):
        return (declared, declared) if declared else None
