"""One vLLM engine for every evaluated model, on the real vLLM CPU engine, against one engine per
model: LoRA-trained models as adapters of their base (`evaluate.engines: lora`), and each model's
full weights loaded into one engine in turn (`evaluate.engines: reload`)."""

import shutil

import pyarrow.compute as pc
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lossaverse.cluster.config import BenchmarkConfig, EngineConfig, SamplingConfig
from lossaverse.cluster.plan import placements
from lossaverse.cluster.evaluate import lora_engine, reload_engine
from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.generation.generate import Competitor, PromptStyle
from lossaverse.pipeline.generation.shards import generate_sharded
from lossaverse.pipeline.models.adapters import adapter_config
from lossaverse.pipeline.sources.benchmarks import load_items
from lossaverse.pipeline.models.tinymodels import resolve_model
from lossaverse.training.export import merge_lora

pytestmark = pytest.mark.integration

ENGINE = EngineConfig(max_model_len=128, kv_cache_gib=0.1, enforce_eager=True, dtype="float32", batch_size=8)


def lora_model(start: str, out, seed: int) -> str:
    """A LoRA of random (nonzero) weights on `start`, exported as training exports one: the merged
    weights in `out`, the adapters in `out/adapter` naming `start` as their base."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    scratch = out.parent / f"{out.name}-scratch"
    get_peft_model(model, config).save_pretrained(scratch)
    merge_lora(start, str(scratch), str(out))
    AutoTokenizer.from_pretrained(start).save_pretrained(out)
    shutil.move(scratch, out / "adapter")
    return str(out)


def answers(tmp, name, items, models):
    """Each model's greedy answer per item. Two samples of each: greedy decoding gives both the same."""
    generate_sharded(items, models, SamplingConfig(samples=2, temperature=0.0, max_tokens=12), PromptStyle(), 0,
                     tmp / f"{name}.shards", tmp / name, "fp", 8, [].append, 1.0)
    table = read_table(tmp / name, ANSWERS)
    assert pc.all(pc.is_null(table["error"])).as_py()
    by_item: dict = {}
    for r in table.to_pylist():
        by_item.setdefault((r["competitor"], r["id"]), []).append(r["completion"])
    assert all(len(texts) == 2 and texts[0] == texts[1] for texts in by_item.values())
    return {key: texts[0] for key, texts in by_item.items()}


def test_two_lora_models_through_one_engine_answer_as_their_merged_models_do(local_ray, tmp_path):
    base = resolve_model("tiny:small")
    first = lora_model(base, tmp_path / "first", seed=1)
    second = lora_model(first, tmp_path / "second", seed=2)  # trained from a trained model: a chain of two
    merged = [Competitor("base", base, engine=ENGINE), Competitor("first", first, engine=ENGINE),
              Competitor("second", second, engine=ENGINE)]
    shared, why_not = lora_engine(merged, tmp_path / "adapters")
    assert why_not is None
    assert [c.engine_name for c in shared] == ["base"] * 3 and len(placements(shared)) == 1
    assert shared[1].lora == str((tmp_path / "first" / "adapter").resolve())  # one adapter: used as it is
    stacked = adapter_config(shared[2].lora)  # the chain, stacked: rank 8 + 8 at scale 1
    assert stacked["r"] == 16 and stacked["lora_alpha"] == 16 and stacked["base_model_name_or_path"] == base
    assert shared[0].engine.engine_kwargs["max_lora_rank"] == 16 and shared[0].engine.engine_kwargs["max_loras"] == 3

    reloaded, why_not = reload_engine(merged)
    assert why_not is None
    assert [c.engine_name for c in reloaded] == ["base"] * 3 and len(placements(reloaded)) == 1
    assert [c.model for c in reloaded] == [base, first, second] and all(c.reload for c in reloaded)

    items, _ = load_items(BenchmarkConfig(n_train=24, n_eval=1), seed=0)
    items = items.filter(pc.equal(items["split"], "train"))
    one = answers(tmp_path, "one", items, shared)
    reload = answers(tmp_path, "reload", items, reloaded)
    # The chain of two in an engine of its own, started on its merged weights. The base's answers in
    # the shared engines come from the model that engine was started on.
    each = answers(tmp_path, "each", items, merged[2:])
    assert len(one) == len(reload) == 3 * 24 and len(each) == 24
    # Greedy: the adapters answer exactly as each model's merged weights loaded into the base's engine,
    assert one == reload
    # and both exactly as the merged model in an engine of its own.
    assert {k: v for k, v in one.items() if k[0] == "second"} == each
    for name in ("first", "second"):  # the adapters and the weights were applied: the models answer otherwise than the base
        assert sum(one[(name, i)] != one[("base", i)] for i in items["id"].to_pylist()) >= 12


def test_a_model_trained_without_lora_keeps_one_engine_per_model(tmp_path):
    base = resolve_model("tiny:small")
    models = [Competitor("base", base, engine=ENGINE), Competitor("full", base, engine=ENGINE)]
    kept, why_not = lora_engine(models, tmp_path)
    assert kept == models and why_not == "a model was trained without LoRA"


def test_a_model_of_another_architecture_keeps_one_engine_per_model():
    small, large = resolve_model("tiny:small"), resolve_model("tiny:large")
    models = [Competitor("small", small, engine=ENGINE), Competitor("large", large, engine=ENGINE)]
    kept, why_not = reload_engine(models)
    assert kept == models
    assert why_not.startswith(f"{large}/config.json differs from the engine model's in ")
