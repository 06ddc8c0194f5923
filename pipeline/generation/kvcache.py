"""KV-cache sizing of a vLLM engine from its model and the generate stage's settings.

A replica of the generate stage has `batch_size * max_concurrent_batches` sequences handed to it
by Ray Data LLM at once; its engine runs up to `max_num_seqs` of them, and each running sequence
holds KV-cache entries for its prompt and its answer. When the cache cannot hold the sequences
the scheduler lets in, vLLM preempts them and computes their prompts again: the stage is then
bound by prefill on a full cache (20 tokens/s on SmolLM2 where `LLM.generate` did 166).

    bytes per token = 2 (K and V) * layers * kv_heads * head_dim * bytes of the cache dtype
    need            = bytes per token * max_model_len * sequences the engine runs at once

`max_model_len` bounds prompt + answer, so `need` holds every running sequence at its longest;
the shared worked examples that prefix caching stores once make the real use smaller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1}
# The smallest cache sized from the model: a tiny model's need (kilobytes) is below what one
# engine step's blocks take, and 64 MiB of host RAM costs nothing.
MIN_CACHE_BYTES = 64 * 2**20


def kv_bytes_per_token(hf_config: dict, dtype: str) -> int:
    """Bytes of KV cache one token takes in every layer, from a Hugging Face `config.json`.

    SmolLM2-135M (30 layers, 3 KV heads of 64) in float32: 2 * 30 * 3 * 64 * 4 = 46,080 bytes."""
    text = hf_config.get("text_config", hf_config)  # multimodal configs nest the language model's
    layers = text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    try:
        width = DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: unknown; valid: {sorted(DTYPE_BYTES)}") from None
    return 2 * layers * kv_heads * head_dim * width


def read_hf_config(model: str) -> dict | None:
    """The model directory's config.json, or None for a hub id or a path without one."""
    path = Path(model) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class KVPlan:
    """What one engine replica is sized for (all counts per replica)."""

    bytes_per_token: int
    tokens_per_sequence: int  # max_model_len: prompt + answer at their longest
    in_flight: int  # sequences Ray Data LLM hands the replica at once
    running: int  # sequences the engine runs at once: min(in_flight, max_num_seqs)
    cache_bytes: int  # the cache the engine gets (kv_cache_gib, or sized from the need)
    sized: bool  # True when cache_bytes was derived here, not set in the config

    @property
    def need_bytes(self) -> int:
        return self.bytes_per_token * self.tokens_per_sequence * self.running

    @property
    def fits(self) -> bool:
        return self.cache_bytes >= self.need_bytes

    @property
    def holds_sequences(self) -> int:
        """Running sequences at their longest that the cache holds."""
        return self.cache_bytes // (self.bytes_per_token * self.tokens_per_sequence)

    def describe(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        how = "sized from the model" if self.sized else "kv_cache_gib"
        line = (f"KV cache {gib(self.cache_bytes)} ({how}): {self.bytes_per_token / 1024:.1f} KiB/token x "
                f"{self.tokens_per_sequence} tokens x {self.running} running sequences "
                f"({self.in_flight} in flight) needs {gib(self.need_bytes)}")
        if self.fits:
            return line
        return (f"{line}; it holds {self.holds_sequences}: the rest wait or are preempted and their prompts "
                f"computed again. Set kv_cache_gib >= {self.need_bytes / 2**30:.2f}, or lower batch_size, "
                f"max_concurrent_batches or engine_kwargs.max_num_seqs")


def plan_kv(engine, hf_config: dict) -> KVPlan:
    """KVPlan of an EngineConfig (lossaverse.pipeline.config) for the model of `hf_config`."""
    per_token = kv_bytes_per_token(hf_config, engine.dtype)
    shape = (per_token, engine.max_model_len, engine.batch_size * engine.max_concurrent_batches, engine.running_seqs)
    if engine.kv_cache_gib:
        return KVPlan(*shape, engine.kv_cache_bytes, False)
    return KVPlan(*shape, max(KVPlan(*shape, 0, True).need_bytes, MIN_CACHE_BYTES), True)
