"""Generation: items -> answers, one Ray Data LLM processor per competitor, in one Ray Data job.

Pure pieces: `build_prompt` (template, few-shot, chat template), `expand_requests` (one request per
(item, sample) with its own seed), `answers_from_outputs` (processor output rows, successful or
failed, -> `answers` rows). The Ray pieces: `processor_for` builds a processor over vLLM engines
or an OpenAI-compatible endpoint (`lossaverse.pipeline.generation.processors`), and
`stream_answers` unions the processors of each wave of competitors (all at once on GPUs or a
cluster, one at a time on one machine's CPU cores) into one dataset and yields its rows as they
finish, for `lossaverse.pipeline.generation.shards` to write. An inference failure is a row with `error` set, never a
lost row; an engine that keeps dying stops the job with its own error (`EngineFailed`).
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa

from lossaverse.pipeline.data.prompts import render, template_for
from lossaverse.pipeline.data.schemas import ANSWERS, ITEMS, check
from lossaverse.pipeline.generation.processors import (  # noqa: F401 (part of this module's interface)
    EngineFailed,
    engine_error,
    engine_kwargs,
    http_config,
    http_processor,
    vllm_config,
    vllm_processor,
)


@dataclass(frozen=True)
class Competitor:
    """One model that answers: a local vLLM engine (`engine`) or an endpoint (`endpoint`)."""

    name: str
    model: str  # local path / hub id, or the served model's name for an endpoint
    chat: bool = False
    engine: Any = None  # lossaverse.pipeline.config.EngineConfig
    endpoint: Any = None  # lossaverse.pipeline.config.EndpointConfig
    params: int | None = None
    style: "PromptStyle | None" = None  # None: the job's (generate's) prompt style
    # Competitors with the same `shared_engine` are answered by one vLLM engine of the first one's
    # `model` (their common base); each with a `lora` adapter folder gets it as a LoRA request
    # (vLLM `enable_lora`); each with `reload` has its own full weights (`model`) loaded into that
    # engine in turn (lossaverse.pipeline.generation.weights).
    lora: str | None = None
    shared_engine: str | None = None
    reload: bool = False

    @property
    def engine_name(self) -> str:
        """The engine that answers this competitor: its own, or the one it shares."""
        return self.shared_engine or self.name


@dataclass(frozen=True)
class PromptStyle:
    template: str | None = None  # None: the benchmark kind's template
    system_prompt: str | None = None
    few_shot: tuple = ()  # (question, answer) pairs

    def stops(self, kind: str, chat: bool) -> list[str]:
        """Stop strings the style itself implies. Worked examples written out as raw text teach a
        model to go on with the next "Question:" after its answer, so a raw few-shot prompt stops
        where the next example would begin. A chat prompt ends its turn with the template's end
        token, on which vLLM stops already; a zero-shot prompt implies nothing."""
        if chat or not self.few_shot:
            return []
        head = template_for(kind, self.template).split("{", 1)[0].strip()
        return [f"\n\n{head}"] if head else ["\n\n"]


def row_seed(seed: int, item_id: str, sample: int) -> int:
    """A per-request seed, so sampled answers do not depend on batching or replica placement."""
    return zlib.crc32(f"{seed}:{item_id}:{sample}".encode()) & 0x7FFFFFFF


def chat_messages(item: dict, style: PromptStyle) -> list[dict]:
    """System prompt, few-shot turns, then the question, as chat messages."""
    template = template_for(item["kind"], style.template)
    messages = [{"role": "system", "content": style.system_prompt}] if style.system_prompt else []
    for question, answer in style.few_shot:
        messages.append({"role": "user", "content": render({**item, "question": question, "choices": None}, template)})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": render(item, template)})
    return messages


def build_prompt(item: dict, style: PromptStyle, tokenizer=None) -> str:
    """The exact text sent to a model: raw (few-shot examples as text) or chat-templated."""
    if tokenizer is not None:
        return tokenizer.apply_chat_template(chat_messages(item, style), tokenize=False, add_generation_prompt=True)
    template = template_for(item["kind"], style.template)
    shots = "".join(
        f"{render({**item, 'question': q, 'choices': None}, template)} {a}\n\n" for q, a in style.few_shot
    )
    return shots + render(item, template)


def sampling_params(sampling, seed: int, item_id: str, sample: int, stop: list[str] = ()) -> dict:
    """vLLM sampling parameters of one request; `stop` (the prompt style's) joins `sampling.stop`."""
    base = sampling.seed if sampling.seed is not None else seed
    params = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": row_seed(base, item_id, sample),
    }
    stops = list(dict.fromkeys([*sampling.stop, *stop]))
    if stops:
        params["stop"] = stops
    return params


def expand_requests(items: pa.Table, competitor: str, model: str, sampling, seed: int, tokenizer=None,
                    style: PromptStyle | None = None, api: str | None = None) -> list[dict]:
    """One request per (item, sample): item columns + competitor, model, sample, prompt,
    sampling_params, and copies the engine stage does not consume: `request_prompt` and `max_tokens`.
    For a chat endpoint (`api="chat"`) the request carries `messages` and the prompt is their JSON."""
    style = style or PromptStyle()
    rows = []
    for item in check(items, ITEMS, "generate input").to_pylist():
        if api == "chat":
            messages = chat_messages(item, style)
            prompt = json.dumps(messages, ensure_ascii=False)
        else:
            messages, prompt = None, build_prompt(item, style, tokenizer)
        stop = style.stops(item["kind"], chat=api == "chat" or tokenizer is not None)
        for sample in range(sampling.samples):
            row = {**item, "competitor": competitor, "model": model, "sample": sample, "prompt": prompt,
                   "request_prompt": prompt, "max_tokens": sampling.max_tokens,
                   "sampling_params": sampling_params(sampling, seed, item["id"], sample, stop)}
            if messages is not None:
                row["messages"] = messages
            rows.append(row)
    return rows


@functools.lru_cache(maxsize=4)
def tokenizer_for(path: str):
    """The Hugging Face tokenizer of the model directory (or id) `path`, cached per process: the chat
    template of chat competitors, and the target's tokenizer for the driver's prompts and divergent negatives."""
    from transformers import AutoTokenizer  # deferred: transformers loads in seconds

    return AutoTokenizer.from_pretrained(path)


def expand_batch(batch: pa.Table, competitor: Competitor, sampling, seed: int, style: PromptStyle) -> pa.Table:
    """`expand_requests` as a Ray Data map over item blocks (runs in the workers, not the driver)."""
    api = competitor.endpoint.api if competitor.endpoint is not None else None
    tokenizer = tokenizer_for(competitor.model) if competitor.chat and api is None else None
    # The request's `model`: Ray Data LLM's engine stage sends a row whose model is not the engine's
    # own as a LoRA request for that adapter.
    rows = expand_requests(batch.select(ITEMS.names), competitor.name, competitor.lora or competitor.model, sampling,
                           seed, tokenizer=tokenizer, style=style, api=api)
    if competitor.reload:  # the weights the engine must hold for these rows
        rows = [{**row, "weights": competitor.model} for row in rows]
    return pa.Table.from_pylist(rows)


_CONTEXT = re.compile(r"max_model_len|maximum context|context length|too long|longer than the maximum", re.I)


def finish_reason(row: dict, error: str | None = None) -> str:
    """Why generation stopped. vLLM's processor output has no finish reason, so it is derived: the
    token budget spent is `length`; a failure is `context_length` when the prompt did not fit, else
    `error`. An endpoint's own finish reason is kept."""
    if error:
        return "context_length" if _CONTEXT.search(error) else "error"
    if row.get("api_finish_reason"):
        return str(row["api_finish_reason"])
    max_tokens = row.get("max_tokens")  # the engine stage consumes `sampling_params`
    if max_tokens is not None and (row.get("num_generated_tokens") or 0) >= max_tokens:
        return "length"
    return "stop"


def answers_from_outputs(rows: list[dict]) -> pa.Table:
    """Processor output rows -> `answers` rows. Failed rows carry `__inference_error__`."""
    out = []
    for row in rows:
        error = row.get("__inference_error__") or row.get("api_error") or None
        item = {name: row.get(name) for name in ITEMS.names}
        if item["choices"] is not None:
            item["choices"] = list(item["choices"])
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


def http_payload(row: dict) -> dict:
    """An OpenAI-compatible request body for one request row (runs in Ray Data workers)."""
    params = dict(row["sampling_params"])
    body = {"model": row["model"], **{k: v for k, v in params.items() if v is not None}}
    if "stop" in body:
        body["stop"] = list(body["stop"])
    if row.get("messages") is not None:
        body["messages"] = [dict(m) for m in row["messages"]]
    else:
        body["prompt"] = row["request_prompt"]
    return {**row, "payload": body}


def http_output(row: dict) -> dict:
    """An OpenAI-compatible response -> the columns `answers_from_outputs` reads."""
    # Ray Data stores responses as one Arrow struct type, so absent keys come back as None.
    response = row.get("http_response") or {}
    if response.get("error") is not None or not response.get("choices"):
        error = response.get("error", response)
        message = error.get("message", json.dumps(error)) if isinstance(error, dict) else str(error)
        return {**row, "api_error": f"endpoint error: {message}"[:2000], "generated_text": "", "num_generated_tokens": 0}
    choice = response["choices"][0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("message") or {}).get("content") or ""
    usage = response.get("usage") or {}
    return {**row, "api_error": None, "generated_text": text, "api_finish_reason": choice.get("finish_reason"),
            "num_generated_tokens": int(usage.get("completion_tokens") or 0)}


def processor_for(competitor: Competitor):
    if competitor.endpoint is not None:
        return http_processor(competitor.endpoint, http_payload, http_output)
    return vllm_processor(competitor.model, competitor.engine, name=competitor.engine_name)


def engine_units(competitors: list[Competitor]) -> list[list[Competitor]]:
    """The competitors grouped by the engine that answers them, in order of first appearance."""
    units: dict[str, list[Competitor]] = {}
    for c in competitors:
        units.setdefault(c.engine_name, []).append(c)
    return list(units.values())


def engine_waves(competitors: list[Competitor], at_once: int | None, nodes: int) -> list[list[Competitor]]:
    """The competitors in waves whose engines run side by side. `at_once` (generate.models_at_once)
    sets the wave size in engines (competitors sharing one engine count once); None chooses it:
    every engine at once where engines have devices of their own (GPU engines, or a cluster of
    several nodes), one at a time where CPU engines share one machine's cores. On 2 cores, 5 CPU
    engines at once ran 3 of them at 14 tokens/s each (their threads fight for the same cores)
    where one alone ran at ~500 tokens/s. Endpoint competitors cost this machine nothing and join
    the first wave."""
    local = engine_units([c for c in competitors if c.endpoint is None])
    remote = [c for c in competitors if c.endpoint is not None]
    if at_once is None:
        on_devices = nodes > 1 or any(c.engine is not None and c.engine.num_gpus for unit in local for c in unit)
        at_once = len(local) if on_devices else 1
    at_once = max(1, at_once)
    waves = [[c for unit in local[i:i + at_once] for c in unit] for i in range(0, len(local), at_once)] or [[]]
    waves[0] = remote + waves[0]
    return [w for w in waves if w]


def stream_answers(shards: dict[str, list[pa.Table]], competitors: list[Competitor], sampling, seed: int,
                   style: PromptStyle, at_once: int | None = None,
                   on_wave: Callable[[list[str]], None] | None = None) -> Iterator[dict]:
    """Yield processor output rows for the given item shards of each competitor, as they finish.

    The competitors of one wave (`engine_waves`) join one Ray Data job (a union), so on a cluster
    the replicas of each model run side by side on their own resources; waves run one after another.
    Each shard is one input block, so shards finish roughly in order and the writer holds only a few
    open shards at a time. `on_wave` is told the names of each wave as its engines start.
    """
    import ray  # deferred: Ray loads in seconds

    todo = [c for c in competitors if shards.get(c.name)]
    for wave in engine_waves(todo, at_once, len([n for n in ray.nodes() if n.get("Alive")])):
        if on_wave is not None:
            on_wave([c.name for c in wave])
        yield from _stream_wave(shards, wave, sampling, seed, style)


def _expand_tagged(batch: pa.Table, competitors: dict, sampling, seed: int, style: PromptStyle) -> pa.Table:
    """`expand_batch` for a block of one competitor's items tagged with its name (`_in_model_order`)."""
    competitor = competitors[batch["__competitor"][0].as_py()]
    return expand_batch(batch.drop_columns(["__competitor"]), competitor, sampling, seed, competitor.style or style)


def _in_model_order(shards: dict[str, list[pa.Table]], unit: list[Competitor], sampling, seed: int, style: PromptStyle):
    """The requests of competitors whose weights take turns in one engine, as one dataset whose
    blocks keep the competitors' order, so that the engine reloads once per model. (A union of one
    dataset per competitor interleaves their blocks as they come, and in order it is round-robin.)"""
    import ray.data  # deferred: Ray loads in seconds

    # One block per shard, as in a competitor's own dataset: the engine stage returns a block's rows
    # when the whole block is answered, so blocks of many shards would turn progress into one jump.
    blocks = [t.append_column("__competitor", pa.array([c.name] * t.num_rows, pa.string()))
              for c in unit for t in shards.get(c.name, [])]
    ds = ray.data.from_arrow(blocks).map_batches(
        _expand_tagged, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"competitors": {c.name: c for c in unit}, "sampling": sampling, "seed": seed, "style": style})
    ds.context.execution_options.preserve_order = True
    return ds


def _stream_wave(shards: dict[str, list[pa.Table]], competitors: list[Competitor], sampling, seed: int,
                 style: PromptStyle) -> Iterator[dict]:
    import ray.data  # deferred: Ray loads in seconds

    outputs = []
    for unit in engine_units(competitors):  # one processor per engine; competitors sharing it in one stream
        if any(c.reload for c in unit):
            requests = _in_model_order(shards, unit, sampling, seed, style)
        else:
            requests = [ray.data.from_arrow(shards[c.name]).map_batches(
                expand_batch, batch_size=None, batch_format="pyarrow",
                fn_kwargs={"competitor": c, "sampling": sampling, "seed": seed, "style": c.style or style},
            ) for c in unit]
            requests = requests[0].union(*requests[1:]) if len(requests) > 1 else requests[0]
        outputs.append(processor_for(unit[0])(requests))
    ds = outputs[0].union(*outputs[1:]) if len(outputs) > 1 else outputs[0]
    engines = {c.engine_name: c for c in competitors if c.endpoint is None}
    try:
        yield from ds.iter_rows()
        for name in engines:  # engines that died and came back: their errors are not needed
            engine_error(name)
    except ray.exceptions.RayError as exc:
        died = [(c, engine_error(name)) for name, c in engines.items()]
        died = [(c, cause) for c, cause in died if cause]
        if not died:
            raise
        c, cause = died[0]
        raise EngineFailed(
            f"the vLLM engine of competitor {c.engine_name!r} kept dying and was restarted {c.engine.max_restarts} time(s) "
            f"(generate.engine.max_restarts), so the job stopped; the engine's error: {cause}"
        ) from exc
