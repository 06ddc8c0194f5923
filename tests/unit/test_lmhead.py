"""lossaverse.training.lmhead: TRL's fused LM head on CPU projects only the labelled positions,
with the same per-token outputs, loss and gradients as its every-position path."""

import copy

import torch
import trl.trainer.utils as trl_utils
from trl.kernels import chunked_logprob
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from lossaverse.training.lmhead import score_labelled_positions_only

OUTPUTS = ("log_probs", "entropy", "is_top1")


def _model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16))
    add_fused_lm_head(model, outputs=OUTPUTS)
    return model


def _run(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_labelled_positions_only_same_outputs_and_gradients_fewer_rows(monkeypatch):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[:, :14] = -100  # a 14-token prompt, 6 completion tokens a row
    labels[2, 17:] = -100  # and a padded row
    projected = []
    real = trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return real.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)
    # TRL's own predicate (an earlier test in this process may have wrapped it), restored after the test.
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)

    model = _model()
    full, full_grads = _run(model, ids, labels)
    assert score_labelled_positions_only() is True
    assert score_labelled_positions_only() is True  # idempotent: wraps the predicate once
    compact, compact_grads = _run(copy.deepcopy(model), ids, labels)

    # The every-position path sends 3 x 19 shifted positions through the head; the compact one the 14 labelled.
    assert projected == [3 * 19, 6 + 6 + 3]
    for field in OUTPUTS + ("label_mask",):
        torch.testing.assert_close(getattr(compact, field), getattr(full, field), rtol=1e-5, atol=1e-6)
    assert (compact.log_probs[labels[:, 1:] == -100] == 0).all()
    torch.testing.assert_close(compact.loss, full.loss)
    assert full_grads.keys() == compact_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_a_trl_without_the_predicate_trains_as_before(monkeypatch, caplog):
    monkeypatch.delattr(trl_utils, "_use_triton")
    assert score_labelled_positions_only() is False
    assert "scores every position on CPU" in caplog.text
