"""The training step on one GPU, without Ray: TRL throughput and MFU, the memory planner, and the
trainer's overhead over a plain PyTorch loop.

    lossaverse bench gpu --size 0.5b --out runs/gpubench     # on a GPU (bf16)
    lossaverse bench gpu --size tiny --out /tmp/gpubench     # anywhere (fp32 on CPU)

(`python -m lossaverse bench gpu ...` where only the GPU wheels are installed: it needs torch,
transformers, TRL and peft, and neither Ray nor vLLM.)

Each run builds a Qwen2-architecture model from a config with random weights (no hub; `0.5b` is
Qwen2-0.5B's shape, 494M parameters with tied embeddings) and trains it on synthetic rows whose
prompt and completion fill `max_length` exactly (a word-level tokenizer: one word, one token).

1. TRL, configured by the project: `TrainConfig` -> `lossaverse.training.worker.training_args` and
   `lossaverse.training.methods.method_args` -> `Method.trainer`, timed by `lossaverse.training.worker.StepMetrics`
   (synchronised with the GPU at each step's start and end). Variants: KTO with a frozen reference
   copy, with `precompute_ref_log_probs`, with LoRA, with both; SFT for comparison.
2. Memory: the peak GPU memory of each run against `lossaverse.training.validate.check_memory` (which calls
   `lossaverse.training.zero.model_state_gib`) for the same model, batch and method; `null` on CPU. The runs
   use one GPU without DeepSpeed, where torch's AdamW keeps its two states in the weights' dtype
   (bf16): 2 + 2 + 4 bytes per trainable parameter where the planner counts DeepSpeed's 2 + 2 + 12,
   and the planner leaves out activations. `after_step_gpu_gib` (memory held between steps:
   weights, reference, optimizer states) separates the two.
3. Overhead: a plain PyTorch loop doing the same forward and backward work on the same model
   (KTO: the policy's forward and backward, its forward on the mismatched KL pairs, the reference's
   two forwards, AdamW), in the same call; TRL's step time over the plain loop's.

MFU (`mfu`): model FLOPs per second over the chip's dense bf16 peak, with N parameters,
(6 + 2 * extra_forwards) * N * tokens/s (lossaverse.training.flops, the count `bench train` uses too): 6N per token for the policy's forward and backward, 2N per
token for each forward without gradients (KTO: the policy on the KL pairs, the reference on the
batch and on the KL pairs, so 3; with precomputed reference log-probs 1; SFT 0). tokens/s counts the
batch's tokens (prompt and completion). The formula leaves out attention's sequence-length term,
counts LoRA's backward as a full one (it skips the frozen weights' gradients), and counts the
LM head on every token although TRL's fused head projects only the completion's.

Output: DIR/gpubench.json ({"size", "device", "peak_tflops", "versions", "runs": [one per run],
"overhead": {"<seq_len>": {"kto": ..., "sft": ...}}}) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from lossaverse.training.config import TrainConfig
from lossaverse.training.flops import extra_forwards, flops_per_token
from lossaverse.training.methods import get_method, method_args, peft_config
from lossaverse.training.validate import check_memory

# Qwen2-0.5B's architecture (its config.json on the hub), random weights.
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6)
SIZES: dict[str, dict] = {
    # tokens_per_step: the batch is tokens_per_step // seq_len rows, so both lengths do the same work.
    "tiny": {"model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True),
             "seq_lens": (32, 64), "tokens_per_step": 256, "steps": 4, "warmup": 1},
    "0.5b": {"model": QWEN2_05B, "seq_lens": (512, 1024), "tokens_per_step": 8192, "steps": 12, "warmup": 3},
}
TOKENIZER_WORDS = 4096  # ids the synthetic text uses (at most the model's vocabulary, less 2 special)
# Dense bf16 peak in TFLOP/s by device name (NVIDIA's datasheets; the sparse figure is twice this).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# (TrainConfig fields, forwards without gradients per step beyond the policy's forward and backward)
VARIANTS: dict[str, tuple[dict, int]] = {
    "kto": ({"method": "kto"}, 3),
    "kto_precompute": ({"method": "kto", "precompute_ref_log_probs": True}, 1),
    "kto_lora": ({"method": "kto", "lora": {}}, 3),
    "kto_lora_precompute": ({"method": "kto", "lora": {}, "precompute_ref_log_probs": True}, 1),
    "sft": ({"method": "sft"}, 0),
}
PLAIN_EXTRA_FORWARDS = {method: extra_forwards(method) for method in ("kto", "sft")}
PLANNER_TOLERANCE = 0.25  # the estimate should be within +-25% of the measured peak


def mfu(params: int, tokens_per_second: float, extra_forwards: int, peak_flops: float | None) -> float | None:
    """(6 + 2 * extra_forwards) * N * tokens/s over the peak; None without a known peak.

    Worked example: N = 5e8, 1e5 tokens/s, KTO with a reference copy (3 extra forwards):
    (6 + 6) * 5e8 * 1e5 = 6e14 FLOP/s, over 989e12 (H200) = 0.6067.
    """
    if not peak_flops:
        return None
    return flops_per_token(params, extra_forwards) * tokens_per_second / peak_flops


def device_peak_flops(device: str, override_tflops: float | None = None) -> float | None:
    """The chip's dense bf16 peak in FLOP/s: `override_tflops` if given, else by the CUDA device's name."""
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    import torch  # deferred: torch loads in seconds

    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def word_tokenizer(words: int):
    """A word-level tokenizer: `w0` ... `w{words-1}` are ids 2 ... words+1, `<pad>` 0, `</s>` 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # deferred: tokenizers loads in seconds
    from transformers import PreTrainedTokenizerFast  # deferred: transformers loads in seconds

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def synthetic_rows(rows: int, seq_len: int, words: int, seed: int):
    """KTO rows (prompt, completion, label) that tokenize to exactly `seq_len` tokens with the EOS the
    trainers append: seq_len // 2 prompt words, the rest completion words less one for the EOS."""
    rng = random.Random(seed)
    half = seq_len // 2

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(words)}" for _ in range(n))

    return pa.table({"prompt": [text(half) for _ in range(rows)],
                     "completion": [" " + text(seq_len - half - 1) for _ in range(rows)],
                     "label": [i % 2 == 0 for i in range(rows)]})


def save_model(spec: dict, device: str, seed: int, folder: Path) -> Path:
    """A Qwen2 causal LM with random weights, saved in Hugging Face format (bf16 on GPU, fp32 on CPU):
    every run loads it from there as a Ray Train worker does, and TRL builds its reference copy
    from that path."""
    import torch  # deferred: torch loads in seconds
    from transformers import AutoModelForCausalLM, Qwen2Config  # deferred: transformers loads in seconds

    torch.manual_seed(seed)
    config = Qwen2Config(**spec, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(device))
    model.save_pretrained(folder)
    return folder


def load_model(folder: Path, device: str):
    from transformers import AutoModelForCausalLM  # deferred: transformers loads in seconds

    return AutoModelForCausalLM.from_pretrained(folder, dtype=_dtype(device))


def _dtype(device: str):
    import torch  # deferred: torch loads in seconds

    return torch.bfloat16 if device == "cuda" else torch.float32


class _Memory:
    """Peak GPU memory of one run, net of what was allocated before it; None on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            import torch  # deferred: torch loads in seconds

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        self.peak_gib = None
        if self.cuda:
            import torch  # deferred: torch loads in seconds

            self.peak_gib = (torch.cuda.max_memory_allocated() - self.base) / 2**30

    def now_gib(self) -> float | None:
        if not self.cuda:
            return None
        import torch  # deferred: torch loads in seconds

        return (torch.cuda.memory_allocated() - self.base) / 2**30


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch  # deferred: torch loads in seconds

        torch.cuda.synchronize()


def _sync_callback(device: str):
    """Waits for the GPU at each step's start and end, so StepMetrics (next in the list) times the
    step's kernels rather than their launch. A no-op on CPU."""
    from transformers import TrainerCallback  # deferred: transformers loads in seconds

    class SyncSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize(device)

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)

    return SyncSteps()


def _rates(seconds: list[float], warmup: int, batch: int, tokens_per_step: float) -> dict:
    steady = seconds[warmup:]
    if not steady:
        raise ValueError(f"only {len(seconds)} steps timed; raise --steps above --warmup={warmup}")
    step = statistics.fmean(steady)
    return {"step_seconds": step, "samples_per_second": batch / step, "tokens_per_second": tokens_per_step / step}


def trl_run(variant: str, model_dir: Path, spec: dict, seq_len: int, batch: int, steps: int, warmup: int, device: str,
            seed: int, work: Path) -> dict:
    """One TRL trainer, set up by the project's own path, trained for `steps` steps."""
    from datasets import Dataset  # deferred: datasets loads in seconds
    from transformers import PrinterCallback  # deferred: transformers loads in seconds

    from lossaverse.training.worker import StepMetrics, training_args  # deferred: imports transformers

    fields, extra = VARIANTS[variant]
    # Validated as a CPU config, then moved to the GPU: one GPU without DeepSpeed (bf16 weights, as
    # the worker loads them) is what this measures, a setting the config may refuse for real runs
    # (bf16 weights without an fp32 master copy lose AdamW's smallest updates).
    train = TrainConfig(**fields, per_device_batch_size=batch, max_length=seq_len, max_steps=steps,
                        checkpoint_every=0, num_workers=1, deepspeed="none", use_gpu=False,
                        ).model_copy(update={"use_gpu": device == "cuda"})
    method = get_method(train.method)
    words = min(TOKENIZER_WORDS, spec["vocab_size"] - 2)
    # SFT keeps the correct half of the rows; twice the rows leave every method `steps` full batches.
    table = method.select(synthetic_rows(2 * steps * batch, seq_len, words, seed))
    t = train.model_dump(mode="json")
    with _Memory(device) as memory:
        model = load_model(model_dir, device)
        params = sum(p.numel() for p in model.parameters())
        metrics = StepMetrics(batch, None)
        trainer = method.trainer(model, training_args(t, seed, str(work / variant)), method_args(train.method, t),
                                 Dataset(table), word_tokenizer(words), [_sync_callback(device), metrics],
                                 peft_config(t["lora"]), train=t)
        trainer.remove_callback(PrinterCallback)  # one dict per step on stdout; the table says it all
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
        after_step = memory.now_gib()  # weights, reference, optimizer states; the trainer frees gradients
        history = trainer.state.log_history
        del trainer, model
    tokens = max(h["num_tokens"] for h in history if "num_tokens" in h)
    estimate = check_memory(params, trainable, train, method.uses_reference)
    rates = _rates([s for _, s in metrics.step_seconds], warmup, batch, tokens / steps)
    return {"kind": "trl", "variant": variant, "method": train.method, "seq_len": seq_len, "batch": batch,
            "steps": steps, "warmup": warmup, "params": params, "trainable": trainable, "extra_forwards": extra,
            "tokens_per_step": tokens / steps, **rates, "peak_gpu_gib": memory.peak_gib,
            "after_step_gpu_gib": after_step, "estimate_gib": estimate,
            "estimate_over_peak": estimate / memory.peak_gib if memory.peak_gib else None,
            "within_tolerance": abs(estimate / memory.peak_gib - 1) <= PLANNER_TOLERANCE if memory.peak_gib else None}


def _completion_logps(model, ids, start: int):
    """Sum of log p(token) over positions start.. of each row; the LM head sees only those positions,
    like TRL's fused head."""
    import torch  # deferred: torch loads in seconds

    hidden = model.model(input_ids=ids).last_hidden_state[:, start - 1:-1]
    logps = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    return logps.gather(-1, ids[:, start:, None]).squeeze(-1).sum(-1)


def plain_run(method: str, model_dir: Path, spec: dict, seq_len: int, batch: int, steps: int, warmup: int, device: str,
              seed: int, beta: float = 0.1, learning_rate: float = 5e-5, max_grad_norm: float = 1.0) -> dict:
    """The same forward and backward work as TRL's trainer in a bare loop: AdamW (fused on GPU),
    gradient clipping, no trainer, no data loader. KTO's loss is Eq. 8 of Ethayarajh et al. (2024)
    with lambda_D = lambda_U = 1 and z0 from the batch's completions rotated by one row."""
    import torch  # deferred: torch loads in seconds

    words = min(TOKENIZER_WORDS, spec["vocab_size"] - 2)
    start = seq_len // 2
    labels = torch.tensor([i % 2 == 0 for i in range(batch)], device=device)
    gen = torch.Generator().manual_seed(seed)
    seconds = []
    with _Memory(device) as memory:
        policy = load_model(model_dir, device).to(device)
        policy.train()
        params = sum(p.numel() for p in policy.parameters())
        reference = copy.deepcopy(policy).eval().requires_grad_(False) if method == "kto" else None
        optim = torch.optim.AdamW(policy.parameters(), lr=learning_rate, fused=device == "cuda")
        for _ in range(steps):
            ids = torch.randint(2, words + 2, (batch, seq_len), generator=gen).to(device)
            _synchronize(device)
            began = time.perf_counter()
            if reference is not None:
                kl_ids = torch.cat([ids[:, :start], ids[:, start:].roll(1, dims=0)], dim=1)
                with torch.no_grad():
                    z0 = (_completion_logps(policy, kl_ids, start) - _completion_logps(reference, kl_ids, start)).mean().clamp(min=0)
                    ref = _completion_logps(reference, ids, start)
                r = _completion_logps(policy, ids, start) - ref
                loss = torch.where(labels, 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r))).mean()
            else:
                loss = -_completion_logps(policy, ids, start).sum() / (batch * (seq_len - start))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            optim.step()
            optim.zero_grad(set_to_none=True)
            _synchronize(device)
            seconds.append(time.perf_counter() - began)
        del policy, reference, optim
    return {"kind": "plain", "variant": f"plain_{method}", "method": method, "seq_len": seq_len, "batch": batch,
            "steps": steps, "warmup": warmup, "params": params, "trainable": params,
            "extra_forwards": PLAIN_EXTRA_FORWARDS[method], "tokens_per_step": float(batch * seq_len),
            **_rates(seconds, warmup, batch, batch * seq_len), "peak_gpu_gib": memory.peak_gib}


def bench_gpu(size: str = "tiny", *, seq_lens: tuple[int, ...] | None = None, steps: int | None = None,
              warmup: int | None = None, variants: tuple[str, ...] = tuple(VARIANTS), plain: tuple[str, ...] = ("kto", "sft"),
              peak_tflops: float | None = None, seed: int = 0) -> dict:
    """Every variant and plain loop at every sequence length; the JSON contract in the module docstring.

    Runs on the GPU when there is one (bf16), else on the CPU (fp32; GPU memory and, without
    `peak_tflops`, MFU are None).
    """
    import datasets  # deferred: datasets loads in seconds
    import torch  # deferred: torch loads in seconds
    import transformers  # deferred: transformers loads in seconds
    import trl  # deferred: TRL loads in seconds

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {sorted(SIZES)}")
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(plain) - set(PLAIN_EXTRA_FORWARDS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; valid: {sorted(VARIANTS)} and plain {sorted(PLAIN_EXTRA_FORWARDS)}")
    s = SIZES[size]
    seq_lens, steps, warmup = seq_lens or s["seq_lens"], steps or s["steps"], s["warmup"] if warmup is None else warmup
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = device_peak_flops(device, peak_tflops)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lv-gpubench-") as tmp:
        model_dir = save_model(s["model"], device, seed, Path(tmp) / "model")
        for seq_len in seq_lens:
            batch = max(2, s["tokens_per_step"] // seq_len)  # KTO needs 2 rows for its KL pairs
            for variant in variants:
                runs.append(trl_run(variant, model_dir, s["model"], seq_len, batch, steps, warmup, device, seed, Path(tmp) / str(seq_len)))
            for method in plain:
                runs.append(plain_run(method, model_dir, s["model"], seq_len, batch, steps, warmup, device, seed))
    for run in runs:
        run["mfu"] = mfu(run["params"], run["tokens_per_second"], run["extra_forwards"], peak)
    overhead = {}
    for seq_len in seq_lens:
        by = {r["variant"]: r for r in runs if r["seq_len"] == seq_len}
        overhead[str(seq_len)] = {m: by[m]["step_seconds"] / by[f"plain_{m}"]["step_seconds"]
                                  for m in plain if m in by and f"plain_{m}" in by}
    return {"size": size, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "dtype": "bfloat16" if device == "cuda" else "float32",
            "peak_tflops": peak / 1e12 if peak else None, "planner_tolerance": PLANNER_TOLERANCE,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "datasets": datasets.__version__},
            "runs": runs, "overhead": overhead}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(result: dict) -> str:
    """The runs as a Markdown table, then TRL's step time over the plain loop's."""
    lines = ["| run | seq | batch | step s | samples/s | tokens/s | MFU | peak GiB | estimate GiB | est/peak |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["runs"]:
        lines.append(f"| {r['variant']} | {r['seq_len']} | {r['batch']} | {r['step_seconds']:.3f} | "
                     f"{r['samples_per_second']:.1f} | {r['tokens_per_second']:.0f} | {_fmt(r['mfu'], '.3f')} | "
                     f"{_fmt(r['peak_gpu_gib'], '.3g')} | {_fmt(r.get('estimate_gib'), '.3g')} | "
                     f"{_fmt(r.get('estimate_over_peak'), '.2f')} |")
    for seq_len, ratios in result["overhead"].items():
        lines.append(f"\nseq {seq_len}: TRL step / plain step: " + ", ".join(f"{m} {v:.2f}" for m, v in ratios.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lossaverse bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpubench.json")
    parser.add_argument("--seq-lens", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                        help="comma-separated, default the size's (0.5b: 512,1024)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the rates")
    parser.add_argument("--variants", type=lambda v: tuple(v.split(",")), default=tuple(VARIANTS))
    parser.add_argument("--plain", type=lambda v: tuple(x for x in v.split(",") if x), default=("kto", "sft"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the device is not known")
    args = parser.parse_args(argv)
    result = bench_gpu(args.size, seq_lens=args.seq_lens, steps=args.steps, warmup=args.warmup, variants=args.variants,
                       plain=args.plain, peak_tflops=args.peak_tflops)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "gpubench.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(args.out / "gpubench.json")  # whole or absent
    print(table(result))
    print(f"\n{result['device_name']}, {result['dtype']}; wrote {args.out / 'gpubench.json'}")


if __name__ == "__main__":
    main()
