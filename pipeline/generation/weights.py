"""One vLLM engine for several full models of one architecture: each model's weights are loaded
into the engine in turn (vLLM's in-place `reload_weights`), instead of one engine start per model.

- `reload_reason`: why a model cannot be answered by another model's engine this way (None: it can).
- `WeightsGate`: the engine replica's schedule of batches over weights. Ray Data LLM runs up to
  `max_concurrent_batches` batches of a replica at once and knows nothing of weights, so the gate
  lets a batch in only while the engine holds its model's weights, and reloads them once the
  batches running have finished.

On CPU an engine start costs 25-30 s in the evaluate stage (Ray actor, vLLM import, engine set-up),
a reload of SmolLM2-135M's weights 0.4-1.1 s; greedy answers are the same as from an engine of the
model's own (`tests/integration/test_lora_engine.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

# What the engine reads of its model besides the weights: the architecture and shapes, the
# tokenizer (vLLM tokenizes every prompt with the engine's), and the sampling defaults.
ENGINE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
# Keys that say where a file was loaded from and what wrote it, not what it describes, and
# `use_cache`, which training turns off (TRL, for gradient checkpointing) and vLLM never reads. The
# weights' dtype is the engine's own (`engine.dtype`) unless the engine takes it from the model ("auto").
_WRITER_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "is_local", "local_files_only", "_commit_hash",
                "use_cache"}
_DTYPE_KEYS = {"torch_dtype", "dtype"}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def reload_reason(base: str, model: str, dtype: str = "auto") -> str | None:
    """Why `model`'s weights cannot be loaded into an engine of `base`, or None where they can:
    every file in ENGINE_FILES must say the same in both folders (both without it is the same),
    apart from who wrote it and, with an engine `dtype` of its own, the weights' dtype."""
    ignore = _WRITER_KEYS | (_DTYPE_KEYS if dtype != "auto" else set())
    for name in ENGINE_FILES:
        a, b = _read(Path(base) / name), _read(Path(model) / name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            return f"{name} is in only one of {base} and {model}"
        differ = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
        if differ:
            return f"{model}/{name} differs from the engine model's in {', '.join(differ[:3])}"
    return None


class WeightsGate:
    """Batches of several models' weights through one engine, in as few reloads as the order they
    arrive in allows. A batch runs at once while the engine holds its weights; otherwise it waits
    until no batch is running and none waits for the weights held, and then the weights are
    reloaded (`reload`, awaited while nothing runs) for it and for every batch waiting on them.
    Batches sent in model order reload once per model."""

    def __init__(self, loaded: str, reload: Callable[[str], Awaitable[None]]):
        self.loaded = loaded
        self.reloads = 0
        self._reload = reload
        self._running = 0
        self._waiting: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def holding(self, weights: str):
        """Run the body while the engine holds `weights`."""
        async with self._changed:
            self._waiting[weights] += 1
            try:
                await self._changed.wait_for(lambda: weights == self.loaded or (
                    self._running == 0 and not self._waiting[self.loaded]))
            finally:
                self._waiting[weights] -= 1
            if weights != self.loaded:
                try:
                    await self._reload(weights)
                except BaseException:
                    self._changed.notify_all()  # the batches still waiting decide again
                    raise
                self.loaded = weights
                self.reloads += 1
                self._changed.notify_all()
            self._running += 1
        try:
            yield
        finally:
            async with self._changed:
                self._running -= 1
                self._changed.notify_all()
