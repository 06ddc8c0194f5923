"""Generation: items -> answers, one Ray Data LLM (vLLM) processor per model, in one Ray Data job.

`expand_requests` (pure) turns items into one request row per (item, sample) with the rendered
prompt and per-row sampling parameters; `answers_from_outputs` (pure) turns processor output rows,
successful or failed, into `answers` rows. `generate_answers` wires them around
`ray.data.llm.build_processor`. An inference failure is a row with `error` set, never a lost row.
"""

from __future__ import annotations

import zlib

import pyarrow as pa

from pipeline.prompts import render, render_chat, template_for
from pipeline.schemas import ANSWERS, ITEMS, check


def row_seed(seed: int, item_id: str, sample: int) -> int:
    """A per-request seed, so sampled answers do not depend on batching or replica placement."""
    return zlib.crc32(f"{seed}:{item_id}:{sample}".encode()) & 0x7FFFFFFF


def expand_requests(items: pa.Table, competitor: str, model: str, sampling, template: str | None, seed: int, tokenizer=None) -> list[dict]:
    """One request per (item, sample): item columns + competitor, model, sample, prompt,
    sampling_params, and `request_prompt`, a copy of the prompt (the engine stage consumes `prompt`)."""
    rows = []
    for item in check(items, ITEMS, "generate input").to_pylist():
        prompt = render(item, template_for(item["kind"], template))
        if tokenizer is not None:
            prompt = render_chat(prompt, tokenizer)
        for sample in range(sampling.samples):
            params = {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": row_seed(seed, item["id"], sample),
            }
            if sampling.stop:
                params["stop"] = list(sampling.stop)
            rows.append({**item, "competitor": competitor, "model": model, "sample": sample, "prompt": prompt,
                         "request_prompt": prompt, "sampling_params": params})
    return rows


def finish_reason(row: dict, error: str | None = None) -> str:
    """vLLM's processor output has no finish reason; derive it: the token budget spent is `length`."""
    if error:
        return "error"
    max_tokens = (row.get("sampling_params") or {}).get("max_tokens")
    if max_tokens is not None and row.get("num_generated_tokens", 0) >= max_tokens:
        return "length"
    return "stop"


def answers_from_outputs(rows: list[dict]) -> pa.Table:
    """Processor output rows -> `answers` rows. Failed rows carry `__inference_error__`."""
    out = []
    for row in rows:
        error = row.get("__inference_error__") or None
        item = {name: row.get(name) for name in ITEMS.names}
        out.append(
            {
                **item,
                "competitor": row["competitor"],
                "model": row["model"],
                "sample": int(row["sample"]),
                "prompt": row["request_prompt"],
                "completion": "" if error else (row.get("generated_text") or ""),
                "finish_reason": finish_reason(row, error),
                "completion_tokens": 0 if error else int(row.get("num_generated_tokens") or 0),
                "error": error,
            }
        )
    return pa.Table.from_pylist(out, schema=ANSWERS)


def processor_config(model_path: str, engine):
    """EngineConfig -> ray.data.llm.vLLMEngineProcessorConfig (one per model)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    bundle = {"CPU": engine.num_cpus}
    if engine.num_gpus:
        bundle["GPU"] = engine.num_gpus
    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs={
            "max_model_len": engine.max_model_len,
            "dtype": engine.dtype,
            "gpu_memory_utilization": engine.gpu_memory_utilization,
            "tensor_parallel_size": engine.tensor_parallel_size,
            "enable_prefix_caching": False,
            "enforce_eager": engine.enforce_eager,
            **({"kv_cache_memory_bytes": int(engine.kv_cache_gib * 2**30)} if engine.kv_cache_gib else {}),
            **engine.engine_kwargs,
        },
        concurrency=engine.concurrency,
        batch_size=engine.batch_size,
        placement_group_config={"bundle_per_worker": bundle},
        # Prompts are rendered (and chat-templated) by expand_requests; vLLM tokenizes itself.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
    )


def generate_answers(items: pa.Table, models: list[tuple[str, str, bool]], engine, sampling, seed: int, template: str | None = None) -> pa.Table:
    """Answers of every model in `models` [(competitor, model_path, chat)] on every item.

    All processors are unioned into one Ray Data job, so on a cluster the replicas of each model
    run side by side on their own resources. Returns rows sorted by (competitor, id, sample).
    """
    import ray.data
    from ray.data.llm import build_processor

    outputs = []
    for competitor, path, chat in models:
        tokenizer = None
        if chat:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        requests = expand_requests(items, competitor, path, sampling, template, seed, tokenizer)
        processor = build_processor(processor_config(path, engine))
        # Blocks of about one engine batch: the default of one block per row costs a task per row.
        blocks = max(1, -(-len(requests) // engine.batch_size))
        outputs.append(processor(ray.data.from_items(requests, override_num_blocks=blocks)))
    ds = outputs[0].union(*outputs[1:]) if len(outputs) > 1 else outputs[0]
    table = answers_from_outputs(ds.take_all())
    return table.sort_by([("competitor", "ascending"), ("id", "ascending"), ("sample", "ascending")])
