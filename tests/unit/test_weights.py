"""Several models' weights through one engine: the gate's schedule (no batch runs on weights not its
own, one reload per model in model order) and which models may share an engine."""

import asyncio
import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from lossaverse.pipeline.generation.weights import WeightsGate, reload_reason


def schedule(batches: list[str], in_flight: int, loaded: str = "base", seed: int = 0):
    """Run `batches` (each the weights it needs) through a gate with at most `in_flight` running at
    once, as Ray Data sends a replica its batches; return the gate and what each batch saw."""
    rng = random.Random(seed)
    seen, reloads = [], []

    async def main():
        async def reload(weights):
            assert gate._running == 0  # nothing runs while the weights change
            reloads.append(weights)
            await asyncio.sleep(0)

        gate = WeightsGate(loaded, reload)
        slots = asyncio.Semaphore(in_flight)

        async def batch(weights):
            async with slots:
                async with gate.holding(weights):
                    for _ in range(rng.randint(1, 3)):  # requests finishing over a few engine steps
                        seen.append((weights, gate.loaded))
                        await asyncio.sleep(0)

        await asyncio.gather(*(batch(w) for w in batches))
        return gate

    return asyncio.run(main()), seen, reloads


def test_batches_in_model_order_reload_once_per_model():
    gate, seen, reloads = schedule(["base"] * 5 + ["a"] * 7 + ["b"] * 6, in_flight=4)
    assert all(want == held for want, held in seen)
    assert reloads == ["a", "b"] and gate.reloads == 2


def test_a_late_batch_of_the_weights_held_runs_before_the_engine_moves_on():
    # a batch of `a` comes after `b`'s: it joins `a`'s batches, no reload to `b` and back
    gate, seen, reloads = schedule(["a", "a", "b", "a", "b"], in_flight=5)
    assert reloads == ["a", "b"]
    assert all(want == held for want, held in seen)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["base", "a", "b", "c"]), min_size=1, max_size=30),
       st.integers(1, 6), st.integers(0, 1000))
def test_every_batch_runs_on_its_own_weights(batches, in_flight, seed):
    gate, seen, reloads = schedule(batches, in_flight, seed=seed)
    assert all(want == held for want, held in seen)
    assert {w for w, _ in seen} == set(batches)  # every batch ran
    assert len(reloads) <= len(batches)
    assert all(a != b for a, b in zip(["base", *reloads], reloads))  # never a reload to the weights held


def test_a_failed_reload_does_not_strand_the_batches_waiting():
    async def main():
        calls = []

        async def reload(weights):
            calls.append(weights)
            if weights == "bad":
                raise RuntimeError("reload failed")

        gate = WeightsGate("base", reload)

        async def batch(weights):
            async with gate.holding(weights):
                await asyncio.sleep(0)

        results = await asyncio.wait_for(asyncio.gather(batch("bad"), batch("a"), return_exceptions=True), 5)
        return results, calls, gate.loaded

    results, calls, loaded = asyncio.run(main())
    assert isinstance(results[0], RuntimeError) and results[1] is None
    assert calls == ["bad", "a"] and loaded == "a"


def write(folder, **files):
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return str(folder)


CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "vocab_size": 256, "torch_dtype": "float32",
          "transformers_version": "4.57.0"}


def test_a_model_trained_from_the_engine_model_may_share_its_engine(tmp_path):
    base = write(tmp_path / "base", **{"config.json": CONFIG, "tokenizer.json": {"model": {"vocab": {"a": 0}}}})
    trained = write(tmp_path / "trained", **{"config.json": {**CONFIG, "torch_dtype": "bfloat16", "transformers_version": "5.0",
                                                            "_name_or_path": "/x", "use_cache": False},
                                             "tokenizer.json": {"model": {"vocab": {"a": 0}}}})
    assert reload_reason(base, trained, dtype="float32") is None
    # with the engine's dtype taken from the model, the weights' dtype matters
    assert reload_reason(base, trained, dtype="auto") == f"{trained}/config.json differs from the engine model's in torch_dtype"


def test_what_the_engine_reads_besides_the_weights_must_be_the_same(tmp_path):
    base = write(tmp_path / "base", **{"config.json": CONFIG, "tokenizer.json": {"model": {"vocab": {"a": 0}}}})
    wider = write(tmp_path / "wider", **{"config.json": {**CONFIG, "hidden_size": 128}, "tokenizer.json": {"model": {"vocab": {"a": 0}}}})
    retok = write(tmp_path / "retok", **{"config.json": CONFIG, "tokenizer.json": {"model": {"vocab": {"b": 0}}}})
    notok = write(tmp_path / "notok", **{"config.json": CONFIG})
    assert reload_reason(base, wider, "float32") == f"{wider}/config.json differs from the engine model's in hidden_size"
    assert reload_reason(base, retok, "float32") == f"{retok}/tokenizer.json differs from the engine model's in model"
    assert reload_reason(base, notok, "float32") == f"tokenizer.json is in only one of {base} and {notok}"
