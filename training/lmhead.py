"""TRL's fused LM head, scoring only the labelled positions on CPU as it does on GPU.

TRL's trainers (SFT, KTO, DPO) replace the model's forward with a fused LM head
(`trl.trainer.utils.add_fused_lm_head`) that returns per-token log-probabilities without
materialising the logits. On Triton devices it projects only the positions whose label is not -100;
everywhere else it projects every position, so that compiled backends (Neuron, XLA) keep one tile
shape. Eager CPU has no compilation to protect, and there the full path sends the prompt's ~200
tokens and the padding through the 49k-column vocabulary tiles of the kernel's torch fallback, to
be masked away afterwards: 40% of an SFT step on SmolLM2 (py-spy, 8 rows of ~260 tokens, 2 threads).

No TRL argument selects the compact path, so `score_labelled_positions_only` rebinds the one
predicate that chooses it, in `trl.trainer.utils` alone: the kernels themselves still run their
torch tiles on CPU. The per-token outputs are the same tensors either way (zero where the label is
-100); only rows that were thrown away are no longer computed.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def score_labelled_positions_only() -> bool:
    """Make TRL's fused LM head project only labelled positions on CPU. Idempotent; True when in
    effect, False (with a warning) on a TRL without the predicate, which then trains as before."""
    import trl.trainer.utils as trl_utils  # deferred: TRL loads in seconds

    current = getattr(trl_utils, "_use_triton", None)
    if current is None:
        log.warning("trl.trainer.utils has no _use_triton: TRL's fused LM head scores every position on CPU")
        return False
    if getattr(current, "lossaverse_compact_on_cpu", False):
        return True

    def compact(device) -> bool:
        return device.type == "cpu" or current(device)

    compact.lossaverse_compact_on_cpu = True
    trl_utils._use_triton = compact
    return True
