"""KTO's loss weights: lambda_D, lambda_U and the loss-aversion knob.

KTO (Ethayarajh et al., ICML 2024, Eq. 8): with r(x, y) = log pi(y|x) / pi_ref(y|x) and the
reference point z0 = KL(pi(y'|x) || pi_ref(y'|x)), estimated from mismatched prompt/completion
pairs of the same micro-batch,

    v(x, y) = lambda_D * sigmoid(beta * (r(x, y) - z0))   if y is desirable
              lambda_U * sigmoid(beta * (z0 - r(x, y)))   if y is undesirable
    L_KTO   = E[lambda_y - v(x, y)]

TRL 1.16's `KTOTrainer` implements exactly this (beta, desirable_weight = lambda_D,
undesirable_weight = lambda_U; the mismatched pairs rotate completions by one inside each
per-device batch), so the trainer is configured, not re-implemented. Its loss also works with one
label only: a batch without desirable rows contributes only the undesirable term, so a
negatives-only dataset trains the model away from the wrong answers.

Prospect theory's loss aversion is lambda_U / lambda_D. The paper recommends
lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] (Sec. 4.2), which `weights: auto` enforces from the
label counts in datasets/stats.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from lossaverse.pipeline.data.build import KTO_RATIO_RANGE, auto_desirable_weight


@dataclass(frozen=True)
class KTOWeights:
    desirable: float  # lambda_D
    undesirable: float  # lambda_U
    ratio: float | None  # lambda_D * n_D / (lambda_U * n_U); None with one label only

    @property
    def loss_aversion(self) -> float:
        return self.undesirable / self.desirable


def weight_ratio(desirable: float, undesirable: float, n_desirable: int, n_undesirable: int) -> float | None:
    if n_desirable == 0 or n_undesirable == 0:
        return None
    return desirable * n_desirable / (undesirable * n_undesirable)


def kto_weights(train, n_desirable: int, n_undesirable: int) -> KTOWeights:
    """lambda_D and lambda_U from the config (`train`) and the label counts.

    - `weights: fixed`: desirable_weight and undesirable_weight as given, or with `loss_aversion` set,
      lambda_U = loss_aversion * lambda_D.
    - `weights: auto`: lambda_U = 1 and lambda_D = n_U / n_D (ratio 1, the low end of the range), or
      with `loss_aversion` set, lambda_D = 1 / loss_aversion, refused when that puts the ratio outside
      [1, 4/3]. With one label only the ratio is undefined; the weights are 1 (or 1 / loss_aversion).

    Raises ValueError naming the range of loss_aversion that this data allows.
    """
    lo, hi = KTO_RATIO_RANGE
    if train.weights == "fixed":
        desirable = train.desirable_weight
        undesirable = desirable * train.loss_aversion if train.loss_aversion else train.undesirable_weight
        return KTOWeights(desirable, undesirable, weight_ratio(desirable, undesirable, n_desirable, n_undesirable))
    if n_desirable == 0 or n_undesirable == 0:
        desirable = 1 / train.loss_aversion if train.loss_aversion else 1.0
        return KTOWeights(desirable, 1.0, None)
    if train.loss_aversion is None:
        desirable = auto_desirable_weight(n_desirable, n_undesirable)
        return KTOWeights(desirable, 1.0, weight_ratio(desirable, 1.0, n_desirable, n_undesirable))
    desirable = 1 / train.loss_aversion
    ratio = weight_ratio(desirable, 1.0, n_desirable, n_undesirable)
    if not lo - 1e-9 <= ratio <= hi + 1e-9:
        allowed = (n_desirable / (hi * n_undesirable), n_desirable / (lo * n_undesirable))
        raise ValueError(
            f"train.loss_aversion={train.loss_aversion} puts lambda_D*n_D/(lambda_U*n_U) at {ratio:.3f}, outside "
            f"[{lo}, {hi:.3f}] for this data ({n_desirable} desirable, {n_undesirable} undesirable rows); "
            f"set loss_aversion in [{allowed[0]:.3f}, {allowed[1]:.3f}] or use weights: fixed"
        )
    return KTOWeights(desirable, 1.0, ratio)
