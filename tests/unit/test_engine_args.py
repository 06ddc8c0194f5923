"""One builder of vLLM engine arguments for the generate stage, the supervisory judge and Ray
Serve: chunked prefill off on CPU (vLLM CPU 0.32 crashes on a split seeded prompt), engine pools
pinned to the configured size, restarts bounded."""

import os

import pytest

from lossaverse.cluster.config import EngineConfig, JudgeConfig, ModelRef, ServeConfig
from lossaverse.pipeline.generation.processors import ENGINE_STAGE, engine_kwargs, engine_threads, last_engine_error, vllm_config
from lossaverse.pipeline.models.tinymodels import resolve_model


def test_cpu_engines_never_split_a_prompt_and_gpu_engines_keep_vllms_default():
    cpu = engine_kwargs(EngineConfig(max_model_len=256))
    assert cpu["enable_chunked_prefill"] is False and "max_num_batched_tokens" not in cpu
    # A step must then hold the longest prompt: raised where max_model_len is above vLLM's CPU default.
    assert engine_kwargs(EngineConfig(max_model_len=4096))["max_num_batched_tokens"] == 4096
    assert "enable_chunked_prefill" not in engine_kwargs(EngineConfig(num_gpus=1))
    chosen = EngineConfig(engine_kwargs={"enable_chunked_prefill": True})
    assert engine_kwargs(chosen)["enable_chunked_prefill"] is True  # the config's own engine_kwargs win


def test_evaluates_cpu_engines_cache_shared_prompt_prefixes_in_small_blocks():
    from lossaverse.cluster.evaluate import eval_engine

    # 32 tokens, the CPU attention's smallest block: a 168-token shared prefix is reused to 160, not 128
    assert engine_kwargs(eval_engine(EngineConfig()))["block_size"] == 32
    assert "block_size" not in engine_kwargs(EngineConfig())  # the generate stage: vLLM's default
    assert "block_size" not in engine_kwargs(eval_engine(EngineConfig(num_gpus=1)))  # GPU engines: vLLM's own
    assert engine_kwargs(eval_engine(EngineConfig(engine_kwargs={"block_size": 128})))["block_size"] == 128


def test_the_stage_the_judge_and_serving_build_the_same_engine_arguments(monkeypatch):
    from lossaverse.serving.model import llm_config

    engine = EngineConfig(max_model_len=128, kv_cache_gib=0.25)
    built = engine_kwargs(engine)
    stage = vllm_config("m", engine).engine_kwargs
    assert {k: stage[k] for k in built} == built
    served = llm_config("target", "m", engine, ServeConfig()).engine_kwargs
    assert {k: served.get(k) for k in built if k != "enable_prefix_caching"} == {k: v for k, v in built.items() if k != "enable_prefix_caching"}
    assert "enable_prefix_caching" not in served  # serving leaves prefix caching to vLLM

    import lossaverse.pipeline.generation.processors
    from lossaverse.pipeline.marker import judge

    built = {}
    monkeypatch.setattr(lossaverse.pipeline.generation.processors, "vllm_processor", lambda path, eng, **kw: built.setdefault("engine", eng))
    cfg = JudgeConfig(enabled=True, model=ModelRef(path="tiny:small"), engine=engine)
    monkeypatch.setattr("lossaverse.pipeline.models.tinymodels.resolve_model", lambda path: resolve_model("tiny:small"))
    judge.processor(cfg)
    assert built["engine"] is engine


def test_concurrency_n_is_a_pool_of_exactly_n_engines():
    """Ray Data LLM reads a plain int n as an autoscaling pool from 1 to n."""
    cfg = vllm_config("m", EngineConfig(concurrency=4))
    assert cfg.concurrency == (4, 4) and cfg.get_concurrency() == {"min_size": 4, "max_size": 4}


def test_cpu_engines_reserve_the_cores_asked_for_run_in_one_process_and_gpu_engines_are_left_alone():
    """cpu_reserved_cores reaches the engine actors' environment as vLLM's own variable. A
    single-worker CPU engine runs its model inside the engine core process (vLLM's CPU platform
    forces a spawned worker unless VLLM_ENABLE_V1_MULTIPROCESSING is 0); a tensor-parallel one
    keeps its workers, and a GPU engine gets no environment of ours."""
    one = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert vllm_config("m", EngineConfig(cpu_reserved_cores=0)).runtime_env == {"env_vars": {**one, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}
    assert vllm_config("m", EngineConfig(cpu_reserved_cores=2)).runtime_env["env_vars"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "2"
    assert vllm_config("m", EngineConfig()).runtime_env == {"env_vars": one}
    assert vllm_config("m", EngineConfig(tensor_parallel_size=2)).runtime_env is None
    assert vllm_config("m", EngineConfig(cpu_reserved_cores=0, num_gpus=1)).runtime_env is None
    with pytest.raises(ValueError, match="cpu_reserved_cores"):
        EngineConfig(cpu_reserved_cores=-1)


def test_a_single_process_cpu_engine_gets_the_cores_less_the_reserved_ones(monkeypatch):
    """engine_threads sets OMP_NUM_THREADS where the engine runs in one process: the cores this
    process may use less VLLM_CPU_NUM_OF_RESERVED_CPU (1 when unset, vLLM's own default), at
    least 1; with the engine's worker processes (the variable unset or 1) it leaves it alone."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's: the actor's num_cpus
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    engine_threads()
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    engine_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    engine_threads()
    assert os.environ["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "6")
    engine_threads()
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_the_engines_own_error_is_read_from_its_log():
    tail = """(EngineCore pid=1) ERROR 12-01 11:31:14 [core.py:1512] EngineCore encountered a fatal error.
(EngineCore pid=1) ERROR 12-01 11:31:14 [core.py:1512] RuntimeError: Worker failed with error 'CPU Generator does not use offset', please check the stack trace above for the root cause
(MainProcess pid=2) ERROR 12-01 11:31:14 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.
"""
    assert last_engine_error(tail).startswith("RuntimeError: Worker failed with error 'CPU Generator does not use offset'")
    assert last_engine_error("all fine\n") is None
    assert ENGINE_STAGE == "vLLMEngineStage"


def test_the_manifest_counts_the_engines_that_ran_and_their_restarts():
    from lossaverse.pipeline.generation.shards import Tally

    t = Tally(total=4, engines_asked=2)
    for actor, pid in [("a", 10), ("a", 10), ("a", 11), ("b", 20)]:  # actor a restarted once (a new process)
        t.add(1, False, "batch", (actor, pid))
    assert {k: t.summary()[k] for k in ("engines_asked", "engines_ran", "engine_restarts")} == {
        "engines_asked": 2, "engines_ran": 2, "engine_restarts": 1}
    assert "engines_ran" not in Tally(total=1).summary()  # an endpoint: no engines


# --- KV-cache sizing (lossaverse.pipeline.generation.kvcache) --------------------------------------

SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


def test_kv_bytes_per_token_worked_by_hand():
    from lossaverse.pipeline.generation.kvcache import kv_bytes_per_token

    # SmolLM2-135M: head_dim = 576 / 9 = 64; 2 (K, V) * 30 layers * 3 KV heads * 64 * 4 bytes = 46,080.
    assert kv_bytes_per_token(SMOLLM2, "float32") == 46_080
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == 23_040
    # No num_key_value_heads: every attention head has its own K and V; an explicit head_dim wins.
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}, "float32") == 2 * 2 * 4 * 16 * 4
    assert kv_bytes_per_token({**SMOLLM2, "head_dim": 128}, "float16") == 2 * 30 * 3 * 128 * 2


def test_the_cache_is_sized_for_the_sequences_the_engine_runs_and_a_small_one_is_named():
    from lossaverse.pipeline.generation.kvcache import plan_kv

    # 8 rows a batch x 8 batches in flight = 64 sequences, 64 <= vLLM's CPU default of 128 running:
    # 46,080 B x 448 tokens x 64 = 1,321,205,760 B (1.23 GiB).
    engine = EngineConfig(batch_size=8, max_concurrent_batches=8, max_model_len=448)
    plan = plan_kv(engine, SMOLLM2)
    assert (plan.in_flight, plan.running) == (64, 64)
    assert plan.need_bytes == plan.cache_bytes == 1_321_205_760 and plan.sized and plan.fits
    assert engine_kwargs(engine, hf_config=SMOLLM2)["kv_cache_memory_bytes"] == 1_321_205_760
    # The job's old settings: 64 x 8 = 512 handed over, 128 running, in 0.5 GiB: it holds 26 at their longest.
    old = plan_kv(EngineConfig(batch_size=64, max_model_len=448, kv_cache_gib=0.5), SMOLLM2)
    assert (old.in_flight, old.running, old.holds_sequences) == (512, 128, 26) and not old.fits
    assert "it holds 26" in old.describe() and "kv_cache_gib >= 2.46" in old.describe()
    # An explicit size wins; max_num_seqs caps what runs.
    assert engine_kwargs(EngineConfig(kv_cache_gib=0.25), hf_config=SMOLLM2)["kv_cache_memory_bytes"] == 2**28
    assert plan_kv(EngineConfig(batch_size=8, max_num_seqs=16), SMOLLM2).running == 16
    assert engine_kwargs(EngineConfig(max_num_seqs=16))["max_num_seqs"] == 16
    # On GPU vLLM sizes its own cache from gpu_memory_utilization.
    assert "kv_cache_memory_bytes" not in engine_kwargs(EngineConfig(num_gpus=1), hf_config=SMOLLM2)


def test_an_unknown_cache_dtype_is_named():
    
    from lossaverse.pipeline.generation.kvcache import kv_bytes_per_token

    with pytest.raises(ValueError, match="dtype 'float64': unknown"):
        kv_bytes_per_token(SMOLLM2, "float64")
