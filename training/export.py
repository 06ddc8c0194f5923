"""The trained model in plain Hugging Face format (what vLLM and Ray Serve load).

Full fine-tuning: the trainer's own `save_model` (under ZeRO-3 every rank takes part, because the
weights are gathered from the shards; rank 0 writes). LoRA: the adapters are saved, then merged
into the base weights (`merge_and_unload`), so the output has no peft dependency; the adapters stay
beside the weights in `<model>/adapter/` (peft's format, its `base_model_name_or_path` the model
training started from), so that one engine can serve several trained models as LoRA adapters of
their base (`lossaverse.pipeline.models.adapters`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lossaverse.pipeline.models.adapters import ADAPTER


def merge_lora(base_model: str, adapter_dir: str, out_dir: str) -> None:
    """Base model + LoRA adapters -> one plain Hugging Face model in `out_dir`."""
    from peft import PeftModel  # deferred: peft loads in seconds
    from transformers import AutoModelForCausalLM  # deferred: transformers loads in seconds

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)


def save_final(trainer, tokenizer, out_dir: str, *, lora: bool, base_model: str, scratch: str, is_main: bool) -> None:
    """Called on every rank after training; leaves a complete model in `out_dir` (rank 0 writes)."""
    if not lora:
        trainer.save_model(out_dir)
    else:
        trainer.save_model(scratch)  # the adapters only
        trainer.accelerator.wait_for_everyone()
        if is_main:
            merge_lora(base_model, scratch, out_dir)
            (Path(scratch) / "training_args.bin").unlink(missing_ok=True)
            shutil.move(scratch, Path(out_dir) / ADAPTER)
    if is_main:
        tokenizer.save_pretrained(out_dir)
        (Path(out_dir) / "training_args.bin").unlink(missing_ok=True)  # a pickle of trainer settings, not model
    trainer.accelerator.wait_for_everyone()
