"""train.max_length against TRL 1.16's truncation: rows it would empty are refused before training."""

import pyarrow as pa
import pytest

from lossaverse.cluster.config import ConfigError
from lossaverse.pipeline.models.tinymodels import build_tokenizer
from lossaverse.training.validate import check_lengths

PROMPT = "Question: Ann has 3 apples and gets 4 more. How many apples now?\nAnswer:"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([PROMPT + " 3 + 4 = 7. The answer is 7."] * 50)


def kto_rows(completion=" 3 + 4 = 7. The answer is 7."):
    return pa.table({"prompt": [PROMPT, PROMPT], "completion": [completion, " 7."], "label": [True, False]})


def test_a_prompt_that_fills_max_length_is_refused_with_the_fix(tokenizer):
    n = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    with pytest.raises(ConfigError, match=rf"2 of 2 training rows have a prompt of train.max_length={n} .*Raise train.max_length above {n}"):
        check_lengths(kto_rows(), tokenizer, n)


def test_an_over_long_row_keeps_a_non_empty_completion_in_trl(tokenizer, tmp_path):
    """One token of room after the prompt: the row is kept, cut short, and TRL still trains on the
    first completion token (the KTO trainer's own tokenization and truncation)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import KTOConfig, KTOTrainer

    n = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    info = check_lengths(kto_rows(), tokenizer, n + 1)
    assert info["rows_cut_short"] == 2 and info["longest_tokens"] > n + 1
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=32))
    model.save_pretrained(tmp_path / "m")
    args = KTOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, use_cpu=True, report_to=[], max_length=n + 1)
    trainer = KTOTrainer(model=LlamaForCausalLM.from_pretrained(tmp_path / "m"), args=args,
                         train_dataset=Dataset.from_dict(kto_rows().to_pydict()), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == n + 1  # cut to max_length
    assert (batch["completion_mask"].sum(dim=1) >= 1).all()  # every row still has a completion token


def test_rows_that_fit_are_not_cut(tokenizer):
    info = check_lengths(kto_rows(), tokenizer, 96)
    assert info == {"max_length": 96, "rows_cut_short": 0, "longest_tokens": info["longest_tokens"]}
    assert info["longest_tokens"] < 96
