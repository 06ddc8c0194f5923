"""KTO with an NLL term on the desirable rows, and a count of how often KTO's reference point was 0.

TRL's `KTOTrainer` has no NLL option, and its loss is one monolithic method, so this is the one
trainer subclass in the project (STYLE.md: subclass only when the arguments cannot express the
need). It changes nothing else: with `nll_weight = 0` the loss is TRL's, value for value.

The loss (Ethayarajh et al., ICML 2024, Eq. 8, plus the NLL anchor of iterative RPO, Pang et al.,
NeurIPS 2024, Eq. 3, here on KTO's desirable rows instead of DPO's chosen ones):

    L = L_KTO + nll_weight * NLL_D
    NLL_D = - sum_{desirable rows i} sum_{completion tokens t} log pi(y_it | x_i, y_i<t)
            / (number of completion tokens of desirable rows in the micro-batch)

NLL_D is SFT's loss on the same rows, so `nll_weight = 1` adds exactly one SFT step's gradient to
each KTO step. Why it is needed: KTO's gradient on a desirable row is at most beta/4 of SFT's
(d/dr sigmoid(beta r) <= beta/4), so on its own KTO barely moves a model toward its right answers,
while the undesirable term pushes the tokens those answers share down (likelihood displacement,
Razin et al., 2024). A micro-batch without desirable rows adds no NLL.

The term is taken from the policy's forward with gradients, so it is part of training steps only
(evaluation losses, computed without gradients, are TRL's). Two metrics are added to each log entry: `nll` (NLL_D as above, averaged over the logged steps)
and `kl_zero` (the share of steps whose KL estimate z0 was clamped to 0; then the `kto` loss is
`apo_zero_unpaired`'s, with no reference point at all).
"""

from __future__ import annotations

import torch
from trl import KTOTrainer


class KTONLLTrainer(KTOTrainer):
    """`trl.KTOTrainer` plus `nll_weight` * the mean NLL of the desirable rows' completion tokens."""

    def __init__(self, *args, nll_weight: float = 0.0, **kwargs):
        if nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
        self.nll_weight = nll_weight
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The policy's own forward is the only one run with gradients (the KL and reference passes
        # run under no_grad); its per-token log-probs (0 outside the completion) are taken from it.
        seen: list = []

        def keep(module, args, kwargs, output):
            if torch.is_grad_enabled() and getattr(output, "log_probs", None) is not None:
                seen.append(output.log_probs)

        handle = model.register_forward_hook(keep, with_kwargs=True)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        mode = "train" if self.model.training else "eval"
        kl = self._metrics[mode]["kl"]
        self._metrics[mode]["kl_zero"].append(float(kl[-1] == 0.0) if kl else 0.0)
        if not seen:
            return result
        width = inputs["input_ids"].size(1) - 1  # as TRL slices it (prompt-learning PEFT adds positions)
        nll = desirable_nll(seen[-1][:, -width:], inputs["completion_mask"], inputs["label"])
        self._metrics[mode]["nll"].append(nll.item())
        if self.nll_weight == 0:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + self.nll_weight * nll, outputs
        return result + self.nll_weight * nll


def desirable_nll(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, labels) -> torch.Tensor:
    """Mean negative log-likelihood of the desirable rows' completion tokens.

    `per_token_logps` is (batch, seq - 1): the log-prob of token t+1 given tokens <= t, 0 outside the
    completion (as TRL's fused LM head returns it); `completion_mask` is (batch, seq), 1 on
    completion tokens. Returns 0 (with a gradient path) when the batch has no desirable row.
    """
    seq = per_token_logps.size(1)
    mask = completion_mask[:, -seq:].to(per_token_logps.device, per_token_logps.dtype)
    chosen = torch.as_tensor(labels, dtype=torch.bool, device=per_token_logps.device)
    mask = mask * chosen[:, None].to(mask.dtype)
    tokens = mask.sum()
    if tokens == 0:
        return per_token_logps.sum() * 0.0
    return -(per_token_logps * mask).sum() / tokens
