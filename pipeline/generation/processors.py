"""Ray Data LLM processors for the generate stage and the supervisory judge: vLLM engines and
OpenAI-compatible endpoints, with the settings that keep a run going or stop it with a reason.

- `engine_kwargs`: the one builder of vLLM engine arguments (also Ray Serve's, `lossaverse.serving.model`),
  chunked prefill off on CPU engines.
- `vllm_processor`: a pool of exactly `concurrency` engines, each restarted at most
  `max_restarts` times; its rows carry the engine that produced them, and an engine that dies
  leaves its own error for `engine_error` (the job then fails with `EngineFailed` naming it).
- `http_processor`: an endpoint whose request still failing after its retries is an error
  response for that row, not a failed job.
"""

from __future__ import annotations

import asyncio
import os
import re

from lossaverse.pipeline.generation.kvcache import plan_kv, read_hf_config
from lossaverse.pipeline.generation.weights import WeightsGate

# vLLM's step token budget on CPU when chunked prefill is on (its default); a prompt longer than
# the budget needs the budget raised once prompts may no longer be split.
_CPU_STEP_TOKENS = 2048


def engine_kwargs(engine, prefix_caching: bool | None = True, hf_config: dict | None = None) -> dict:
    """EngineConfig -> vLLM engine arguments: the one builder behind the generate stage, the
    supervisory judge's engine and Ray Serve's engine (`lossaverse.serving.model.llm_config`).

    On CPU (num_gpus 0) chunked prefill is off. vLLM CPU 0.32 fails a seeded request whose prompt
    is split across engine steps ("CPU Generator does not use offset"), every request here is
    seeded, and a full batch of few-shot prompts overflows one step's token budget, so with it on
    the engine dies on every batch. With it off the scheduler waits for the next step instead of
    splitting a prompt, so a step's budget must hold the longest prompt: `max_num_batched_tokens`
    is raised to `max_model_len` where that is above vLLM's CPU default. `prefix_caching` None
    leaves vLLM's default; on, the system turn and worked examples every prompt shares are computed
    once, not once a request. With `hf_config` (the model's config.json) and no `kv_cache_gib`, a
    CPU engine's cache is sized from the model for the sequences it runs at once
    (`lossaverse.pipeline.generation.kvcache.plan_kv`). `engine.engine_kwargs` override everything here.
    """
    kwargs = {
        "max_model_len": engine.max_model_len,
        "dtype": engine.dtype,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "enforce_eager": engine.enforce_eager,
    }
    if prefix_caching is not None:
        kwargs["enable_prefix_caching"] = prefix_caching
    if engine.max_num_seqs:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = engine.kv_cache_bytes
    elif hf_config is not None and not engine.num_gpus:
        kwargs["kv_cache_memory_bytes"] = plan_kv(engine, hf_config).cache_bytes
    if not engine.num_gpus:
        kwargs["enable_chunked_prefill"] = False
        if engine.max_model_len > _CPU_STEP_TOKENS:
            kwargs["max_num_batched_tokens"] = engine.max_model_len
    return {**kwargs, **engine.engine_kwargs}


def engine_env(engine) -> dict[str, str]:
    """Environment variables of a vLLM engine process (vLLM reads both from the environment only,
    at start-up); empty for GPU engines.

    - `cpu_reserved_cores` as VLLM_CPU_NUM_OF_RESERVED_CPU: the worker binds its OpenMP threads to
      the node's cores minus those.
    - VLLM_ENABLE_V1_MULTIPROCESSING=0 for a single-worker CPU engine (tensor and pipeline
      parallel size 1): the model runs inside the EngineCore process (vLLM's "uni" executor)
      instead of one more spawned worker process that polls the engine core over shared memory.
      `lossaverse bench generate configs/local.yaml --replicas 1 --prompts 256` on 2 cores: the
      stage's first answer after 46 s against 57 s, the same steady tokens/s (448 against 453).
      bf16 greedy texts can differ from the worker-process layout's (38 of 400 items for
      SmolLM2); fp32 texts were identical. vLLM's CPU platform forces the multiprocessing
      executor while this variable is 1, so it cannot be set through engine arguments; a
      tensor-parallel engine keeps its worker processes. Its OpenMP thread count is
      then set on the node by `engine_threads`."""
    if engine.num_gpus:
        return {}
    env = {}
    if engine.bundles_per_replica == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if engine.cpu_reserved_cores is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(engine.cpu_reserved_cores)
    return env


def engine_threads() -> None:
    """In a process about to start a single-process CPU engine (`engine_env`), set the OpenMP
    threads the engine core process will run the model on: the cores this process may use less
    VLLM_CPU_NUM_OF_RESERVED_CPU (vLLM's default reserve, 1, when unset). vLLM's multiprocessing
    executor sets the same count for its worker, and it skips that set-up in one process; the
    engine core would otherwise inherit Ray's OMP_NUM_THREADS (the actor's `num_cpus`, 1 here).
    Does nothing where the engine keeps its own worker processes (GPU or tensor-parallel)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        return
    reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) - reserved))


def vllm_config(model_path: str, engine):
    """EngineConfig -> ray.data.llm.vLLMEngineProcessorConfig: replicas, parallelism, bundles.

    `concurrency: n` is pinned to a pool of exactly n engines: Ray Data LLM reads a plain int as
    an autoscaling pool from 1 to n, which may run fewer engines than the plan counted on."""
    from ray.data.llm import vLLMEngineProcessorConfig  # deferred: Ray loads in seconds

    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(engine, hf_config=read_hf_config(model_path)),
        # The engine actors' environment (Ray Data passes it to their map_batches), which the
        # engine's own processes inherit.
        runtime_env={"env_vars": env} if (env := engine_env(engine)) else None,
        concurrency=(engine.concurrency, engine.concurrency),
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.max_concurrent_batches,
        # Ray Data LLM repeats this bundle tensor_parallel_size * pipeline_parallel_size times.
        placement_group_config={"bundle_per_worker": engine.bundle, "strategy": engine.placement_strategy},
        # Prompts are rendered (and chat-templated) by expand_batch; vLLM tokenizes itself.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
    )


ENGINE_STAGE = "vLLMEngineStage"


class EngineFailed(RuntimeError):
    """An engine replica died more often than `generate.engine.max_restarts` allows; the message
    carries the engine's own error."""


_KV_NAMESPACE = "lossaverse"
_ERROR_LINE = re.compile(r"(?:^|\] )((?:[\w.]+\.)?\w*(?:Error|Exception): .+)$")


def _engine_error_key(job_id: str, competitor: str) -> str:
    return f"engine-error:{job_id}:{competitor}"


def last_engine_error(log_tail: str) -> str | None:
    """The last exception line of an engine's log (its root cause: vLLM's EngineCore logs the
    traceback before the engine is declared dead), without vLLM's log prefix; the EngineDeadError
    that only points back at it is skipped."""
    found = None
    for line in log_tail.splitlines():
        m = _ERROR_LINE.search(line.strip())
        if m and "EngineDeadError" not in m.group(1):
            found = m.group(1)
    return found[:500] if found else None


def _own_log_tail(limit: int = 65536) -> str:
    """The end of this process's stdout and stderr, which Ray sends to the worker's log files and
    the engine's subprocesses inherit."""
    text = []
    for fd in (1, 2):
        try:
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
                text.append(f.read().decode(errors="replace"))
        except OSError:  # not Linux, or not a file
            continue
    return "\n".join(text)


def _tagged_engine_udf(competitor: str):
    """ray.data.llm's vLLM engine stage, with two additions:

    - each output row is tagged by the engine that produced it: `engine_actor` (the replica's
      actor id, kept across restarts) and `engine_pid` (its process, new at each restart), from
      which `lossaverse.pipeline.generation.shards.Tally` counts the engines that actually ran;
    - when the engine dies, its own error (read from the end of the replica's log) is left in
      Ray's key-value store before the replica exits, for `stream_answers` to name if the job
      fails: the error Ray Data raises then only says that an actor died;
    - rows with a `weights` column (competitors with `reload`, see
      `lossaverse.pipeline.generation.weights`) are answered by the engine holding those weights:
      each batch's rows of one model run under the replica's `WeightsGate`, which reloads the
      engine's weights in place between models (and forgets the prefix cache computed with the
      old ones). Such a row is sent as the engine's own model, not as a LoRA adapter.

    Built on first use, so that importing this module does not import Ray or vLLM."""
    import ray  # deferred: Ray loads in seconds
    from ray.experimental.internal_kv import _internal_kv_put  # deferred: Ray loads in seconds
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF  # deferred: Ray loads in seconds
    from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS  # deferred: Ray loads in seconds

    # The same name as the base class: it names the engine actors' processes
    # (`ray::MapWorker(MapBatches(vLLMEngineStageUDF))`), which tools and tests look for.
    class vLLMEngineStageUDF(vLLMEngineStageUDF):  # noqa: N801 (vLLM's name)
        def __init__(self, *args, **kwargs):
            engine_threads()
            super().__init__(*args, **kwargs)
            generate = self.llm.generate_async

            async def watched(row):
                try:
                    return await generate(row)
                except VLLM_FATAL_ERRORS:  # the base class exits the replica on these
                    cause = last_engine_error(_own_log_tail()) or "the engine died (no error in its log)"
                    job = ray.get_runtime_context().get_job_id()
                    _internal_kv_put(_engine_error_key(job, competitor), cause.encode(), overwrite=True, namespace=_KV_NAMESPACE)
                    raise

            self.llm.generate_async = watched
            self.weights = WeightsGate(self.model, self._reload)

        async def _reload(self, weights: str) -> None:
            engine = self.llm.engine
            await engine.collective_rpc("reload_weights", kwargs={"weights_path": weights})
            if not await engine.reset_prefix_cache():
                raise RuntimeError(f"the prefix cache was not reset after loading {weights}: requests were running")

        async def udf(self, batch):
            tag = {"engine_actor": ray.get_runtime_context().get_actor_id(), "engine_pid": os.getpid()}
            groups: dict = {}  # a batch may span the blocks of two models
            for row in batch:
                groups.setdefault(row.get("weights"), []).append(row)
            for weights, rows in groups.items():
                if weights is None:
                    async for out in super().udf(rows):
                        yield {**out, **tag}
                    continue
                async with self.weights.holding(weights):
                    async for out in super().udf([{**row, "model": self.model} for row in rows]):
                        yield {**out, **tag}

    return vLLMEngineStageUDF


def engine_error(competitor: str) -> str | None:
    """The error an engine of `competitor` died of in this Ray job, if one did (and forget it)."""
    import ray  # deferred: Ray loads in seconds
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get  # deferred: Ray loads in seconds

    key = _engine_error_key(ray.get_runtime_context().get_job_id(), competitor)
    value = _internal_kv_get(key, namespace=_KV_NAMESPACE)
    if value is not None:
        _internal_kv_del(key, namespace=_KV_NAMESPACE)
    return value.decode() if value is not None else None


def vllm_processor(model_path: str, engine, preprocess=None, postprocess=None, name: str = "engine"):
    """A ray.data.llm processor over vLLM engines whose replicas restart at most
    `engine.max_restarts` times each.

    A fatal engine error makes the replica exit so that Ray restarts it with a fresh engine; Ray
    Data's default is to restart forever, so an engine that dies the same way on every batch would
    loop forever. Bounded, the replica stays dead after its last restart and the job fails
    (`stream_answers` then names the engine's own error)."""
    from ray.data.llm import build_processor  # deferred: Ray loads in seconds

    processor = build_processor(vllm_config(model_path, engine), preprocess=preprocess, postprocess=postprocess)
    # max_restarts: Ray's actor option, which Ray Data's map_batches passes to the engine actors
    # (processor configs do not expose it). Batches lost with a replica are retried on its restart.
    # In place: assigning the field would re-run the stage's validator, which derives the actor's
    # resources from the placement group config it has already consumed (and would ask for a GPU).
    stage = processor.get_stage_by_name(ENGINE_STAGE)
    stage.map_batches_kwargs["max_restarts"] = engine.max_restarts
    stage.__dict__["fn"] = _tagged_engine_udf(name)  # likewise not through the validating setter
    return processor


_LAST_EXCEPTION = re.compile(r"Previous Exception: (.*?)\. Full Traceback", re.S)


def _row_errors_udf():
    """ray.data.llm's HTTP request stage with a request that still fails after `max_retries`
    answered by an error response for its row (which `http_output` turns into an error row), not
    raised: raised, it fails the batch and with it the whole job. Built on first use, so that
    importing this module does not import Ray."""
    from ray.llm._internal.batch.stages.http_request_stage import HttpRequestUDF  # deferred: Ray loads in seconds

    class RowErrorsHttpRequestUDF(HttpRequestUDF):
        def __init__(self, *args, qps: int | None = None, **kwargs):
            super().__init__(*args, qps=None, **kwargs)
            self.row_qps = qps  # paced here: each row is its own request below

        async def _one(self, row: dict, delay: float) -> list[dict]:
            await asyncio.sleep(delay)
            try:
                return [out async for out in HttpRequestUDF.udf(self, [row])]
            except RuntimeError as exc:  # "Reached maximum retries of N ..."
                cause = _LAST_EXCEPTION.search(str(exc))
                message = f"no answer after {self.max_retries} retries ({cause.group(1) if cause else exc})"
                return [{self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "http_response": {"error": {"message": message}}}]

        async def udf(self, batch: list[dict]):
            step = 1.0 / self.row_qps if self.row_qps else 0.0
            for done in asyncio.as_completed([self._one(row, i * step) for i, row in enumerate(batch)]):
                for out in await done:
                    yield out

    return RowErrorsHttpRequestUDF


def http_processor(endpoint, preprocess, postprocess):
    """A ray.data.llm processor over an OpenAI-compatible endpoint in which a request that fails
    after its retries is an error row and the job goes on (see `_row_errors_udf`)."""
    from ray.data.llm import build_processor  # deferred: Ray loads in seconds

    processor = build_processor(http_config(endpoint), preprocess=preprocess, postprocess=postprocess)
    processor.get_stage_by_name("HttpRequestStage").fn = _row_errors_udf()
    return processor


def http_config(endpoint):
    """EndpointConfig -> ray.data.llm.HttpRequestProcessorConfig (URL, key from the environment,
    qps limit, retries with exponential backoff)."""
    from ray.data.llm import HttpRequestProcessorConfig  # deferred: Ray loads in seconds

    headers = dict(endpoint.headers)
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if not key:
            raise ValueError(f"endpoint {endpoint.url}: environment variable {endpoint.api_key_env} (the API key) is not set")
        headers["Authorization"] = f"Bearer {key}"
    path = "/chat/completions" if endpoint.api == "chat" else "/completions"
    return HttpRequestProcessorConfig(
        url=endpoint.url.rstrip("/") + path,
        headers=headers,
        qps=endpoint.qps,
        max_retries=endpoint.max_retries,
        base_retry_wait_time_in_s=endpoint.retry_wait_s,
        concurrency=endpoint.concurrency,
        batch_size=endpoint.batch_size,
    )
