"""One builder of vLLM engine arguments for the generate stage, the supervisory judge and Ray
Serve: chunked prefill off on CPU (vLLM CPU 0.32 crashes on a split seeded prompt), engine pools
pinned to the configured size, restarts bounded."""

from lossaverse.cluster.config import EngineConfig, JudgeConfig, ModelRef, ServeConfig
from lossaverse.pipeline.processors import ENGINE_STAGE, engine_kwargs, last_engine_error, vllm_config
from lossaverse.pipeline.tinymodels import resolve_model


def test_cpu_engines_never_split_a_prompt_and_gpu_engines_keep_vllms_default():
    cpu = engine_kwargs(EngineConfig(max_model_len=256))
    assert cpu["enable_chunked_prefill"] is False and "max_num_batched_tokens" not in cpu
    # A step must then hold the longest prompt: raised where max_model_len is above vLLM's CPU default.
    assert engine_kwargs(EngineConfig(max_model_len=4096))["max_num_batched_tokens"] == 4096
    assert "enable_chunked_prefill" not in engine_kwargs(EngineConfig(num_gpus=1))
    chosen = EngineConfig(engine_kwargs={"enable_chunked_prefill": True})
    assert engine_kwargs(chosen)["enable_chunked_prefill"] is True  # the config's own engine_kwargs win


def test_the_stage_the_judge_and_serving_build_the_same_engine_arguments(monkeypatch):
    from lossaverse.serving.model import llm_config

    engine = EngineConfig(max_model_len=128, kv_cache_gib=0.25)
    built = engine_kwargs(engine)
    stage = vllm_config("m", engine).engine_kwargs
    assert {k: stage[k] for k in built} == built
    served = llm_config("target", "m", engine, ServeConfig()).engine_kwargs
    assert {k: served.get(k) for k in built if k != "enable_prefix_caching"} == {k: v for k, v in built.items() if k != "enable_prefix_caching"}
    assert "enable_prefix_caching" not in served  # serving leaves prefix caching to vLLM

    import lossaverse.pipeline.processors
    from lossaverse.pipeline import judge

    built = {}
    monkeypatch.setattr(lossaverse.pipeline.processors, "vllm_processor", lambda path, eng, **kw: built.setdefault("engine", eng))
    cfg = JudgeConfig(enabled=True, model=ModelRef(path="tiny:small"), engine=engine)
    monkeypatch.setattr("lossaverse.pipeline.tinymodels.resolve_model", lambda path: resolve_model("tiny:small"))
    judge.processor(cfg)
    assert built["engine"] is engine


def test_concurrency_n_is_a_pool_of_exactly_n_engines():
    """Ray Data LLM reads a plain int n as an autoscaling pool from 1 to n."""
    cfg = vllm_config("m", EngineConfig(concurrency=4))
    assert cfg.concurrency == (4, 4) and cfg.get_concurrency() == {"min_size": 4, "max_size": 4}


def test_the_engines_own_error_is_read_from_its_log():
    tail = """(EngineCore pid=1) ERROR 12-01 11:31:14 [core.py:1512] EngineCore encountered a fatal error.
(EngineCore pid=1) ERROR 12-01 11:31:14 [core.py:1512] RuntimeError: Worker failed with error 'CPU Generator does not use offset', please check the stack trace above for the root cause
(MainProcess pid=2) ERROR 12-01 11:31:14 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.
"""
    assert last_engine_error(tail).startswith("RuntimeError: Worker failed with error 'CPU Generator does not use offset'")
    assert last_engine_error("all fine\n") is None
    assert ENGINE_STAGE == "vLLMEngineStage"


def test_the_manifest_counts_the_engines_that_ran_and_their_restarts():
    from lossaverse.pipeline.shards import Tally

    t = Tally(total=4, engines_asked=2)
    for actor, pid in [("a", 10), ("a", 10), ("a", 11), ("b", 20)]:  # actor a restarted once (a new process)
        t.add(1, False, "batch", (actor, pid))
    assert {k: t.summary()[k] for k in ("engines_asked", "engines_ran", "engine_restarts")} == {
        "engines_asked": 2, "engines_ran": 2, "engine_restarts": 1}
    assert "engines_ran" not in Tally(total=1).summary()  # an endpoint: no engines
