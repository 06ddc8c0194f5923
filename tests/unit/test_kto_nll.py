"""The NLL term of lossaverse.training.kto_nll: the loss moves by exactly nll_weight x the desirable rows' NLL."""

import pytest
import torch

from lossaverse.training.kto_nll import desirable_nll


def test_desirable_nll_by_hand():
    """Row 0 is desirable with completion tokens at positions 1 and 2 (log-probs -1 and -2 at the
    shifted positions 0 and 1); row 1 is undesirable and does not count: NLL = (1 + 2) / 2 = 1.5."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    assert desirable_nll(logps, mask, [True, False]).item() == pytest.approx(1.5)
    assert desirable_nll(logps, mask, [False, False]).item() == 0.0  # no desirable row: no NLL


def test_negative_weight_is_refused():
    from lossaverse.training.kto_nll import KTONLLTrainer

    with pytest.raises(ValueError, match="nll_weight must be >= 0"):
        KTONLLTrainer(nll_weight=-1.0)


def test_trainer_loss_moves_by_the_hand_computed_nll(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import KTOConfig

    from lossaverse.pipeline.models.tinymodels import build_tokenizer
    from lossaverse.training.kto_nll import KTONLLTrainer

    prompts = ["Question: 1 + 2?\nAnswer:", "Question: 3 + 4?\nAnswer:"] * 2
    completions = [" 3.", " 8.", " 7.", " 1."]
    labels = [True, False, True, False]
    tok = build_tokenizer([p + c for p, c in zip(prompts, completions)] * 20)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "model")  # the trainer loads its reference model from the path
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    data = Dataset.from_dict({"prompt": prompts, "completion": completions, "label": labels})

    def trainer(weight):
        args = KTOConfig(output_dir=str(tmp_path / str(weight)), per_device_train_batch_size=4, use_cpu=True,
                         report_to=[], max_length=32, beta=0.1)
        return KTONLLTrainer(model=model, args=args, train_dataset=data, processing_class=tok, nll_weight=weight)

    plain, anchored = trainer(0.0), trainer(0.5)
    batch = next(iter(plain.get_train_dataloader()))
    model.eval()  # no dropout; the same weights in both calls (the metrics go under "eval")
    # With gradients on, as in a training step (the term is taken from the policy's own forward).
    base = plain.compute_loss(model, batch).item()
    with_nll = anchored.compute_loss(model, batch).item()
    with torch.no_grad():
        # By hand: a plain forward, the mean -log p of the desirable rows' completion tokens.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["completion_mask"][:, 1:].float() * torch.as_tensor(batch["label"])[:, None].float()
        nll = -(logp * mask).sum() / mask.sum()
    assert mask.sum() > 0
    assert with_nll - base == pytest.approx(0.5 * nll.item(), rel=1e-4)
    assert anchored._metrics["eval"]["nll"][-1] == pytest.approx(nll.item(), rel=1e-4)
    assert anchored._metrics["eval"]["kl_zero"][-1] in (0.0, 1.0)
