"""Training against the machine: the FLOPs a training step does, the machine's measured matmul peak,
and their ratio (model FLOPs utilisation, MFU; Chowdhery et al. 2022, PaLM, appendix B).

Per token of a sequence (prompt and completion; N the model's parameters, L the trainable LoRA
parameters), counting a matmul of an (m x k) by a (k x n) matrix as 2mkn FLOPs and leaving out
attention's own score FLOPs (small at these lengths):

- forward: 2N; backward: 2N for the activations' gradients plus 2N for the weights' gradients.
- full fine-tuning, one pass: 6N (forward + backward).
- LoRA: the frozen weights need no weight gradients: 4N, plus 6L for the adapters themselves.
- SFT: one pass on each sequence.
- KTO (TRL): the pass on each sequence, plus a forward without gradients on its mismatched KL
  sequence (the reference point z0; about as long), plus the reference model's forward on both
  (with LoRA, the same weights with the adapters off): 6N + 2N + 4N = 12N in full, 10N + 6L with
  LoRA. With precomputed reference log-probs the reference forwards happen once, before training:
  8N, or 6N + 6L.
"""

from __future__ import annotations

import time


def extra_forwards(method: str, precomputed_reference: bool = False) -> int:
    """Forwards without gradients per sequence besides the training pass (module docstring): SFT
    none; KTO the policy on the KL sequence, and the reference on both unless precomputed."""
    if method == "sft":
        return 0
    if method == "kto":
        return 1 if precomputed_reference else 3
    raise ValueError(f"FLOP count for method {method!r}: not written; valid: kto, sft")


def flops_per_token(params: int, forwards: int, lora_params: int = 0) -> int:
    """Training FLOPs per token of a sequence: one training pass (6N, or 4N + 6L with LoRA) and
    `forwards` forwards without gradients (2N each; `extra_forwards`)."""
    one_pass = 4 * params + 6 * lora_params if lora_params else 6 * params
    return one_pass + 2 * params * forwards


def matmul_peak(n: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """FLOP/s of the best of `repeats` fp32 `torch.matmul`s of two n x n matrices (2n^3 FLOPs
    each), on `threads` threads (the worker's CPUs); the machine's attainable peak, measured."""
    import torch  # deferred: torch loads in seconds

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up: thread pool, caches
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best


def mfu(samples_per_second: float, tokens_per_sample: float, flops_token: int, peak: float) -> dict:
    """Achieved FLOP/s of a training run and its share of `peak`."""
    achieved = samples_per_second * tokens_per_sample * flops_token
    return {"tokens_per_sample": round(tokens_per_sample, 1), "flops_per_token": flops_token,
            "achieved_flops": achieved, "peak_flops": peak, "mfu": achieved / peak if peak else 0.0}
