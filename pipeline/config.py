"""Config models of the lowest layer: what every layer shares, and the pipeline stages' own.

Shared: `ConfigError`, the strict base model (`Strict`: unknown keys are errors, values frozen),
`field_errors` / `errors_in` (pydantic's errors as `field.path: message`), `apply_overrides`
(`--set a.b=c`), the model reference (`ModelRef`) and the Ray settings (`RayConfig`). The
stages': benchmark, vLLM engine, sampling, generate, mark (with the supervisory LLM), datasets and
evaluate. Training's model lives in training/config.py, serving's in serving/config.py, and
cluster/config.py composes them all into the run config. Each default lives in its model only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lossaverse.pipeline.data.kinds import kind_of
from lossaverse.pipeline.data.synthetic import FAMILIES
from lossaverse.pipeline.models.tinymodels import TINY_SIZES
from lossaverse.pipeline.sources.benchmarks import LOADERS


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def field_errors(err: ValidationError, blank: str = "") -> list[str]:
    """pydantic's errors as `field.path: message`, without its "Value error, " prefix; an error of
    the whole model (no field) reads `blank: message`, or the message alone when `blank` is empty."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or blank
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}" if field else msg)
    return parts


def errors_in(where: str, err: ValidationError) -> str:
    """One line naming every bad field: `where: field: message; field: message`."""
    return f"{where}: " + "; ".join(field_errors(err))


TINY_PREFIX = "tiny:"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EndpointConfig(Strict):
    """A competitor served elsewhere behind an OpenAI-compatible API (ray.data.llm HTTP processor)."""

    url: str = Field(pattern=r"^https?://")  # the API base, e.g. http://host:8000/v1
    api: Literal["completions", "chat"] = "completions"  # POST {url}/completions or /chat/completions
    api_key_env: str | None = None  # name of the environment variable holding the key, never the key
    headers: dict[str, str] = Field(default_factory=dict)
    qps: int | None = Field(default=None, ge=1)  # per replica; None: no limit
    max_retries: int = Field(default=3, ge=0)  # on 408/429/502/503/504 and connection errors
    retry_wait_s: float = Field(default=1.0, gt=0)  # exponential backoff base
    concurrency: int = Field(default=1, ge=1)  # request actors
    batch_size: int = Field(default=16, ge=1)


class FewShot(Strict):
    question: str
    answer: str


class ModelRef(Strict):
    """A model: a Hugging Face id, a local directory, or `tiny:<size>` (built locally, offline);
    or, with `endpoint`, the model name an OpenAI-compatible server knows it by."""

    endpoint: EndpointConfig | None = None
    path: str
    chat: bool = False  # render prompts with the tokenizer's chat template (instruction models)
    params: int | None = Field(default=None, gt=0)  # declared parameter count (endpoints)
    # Engine settings of this model only, over `generate.engine` (replicas, tensor parallel, ...).
    engine: dict[str, Any] = Field(default_factory=dict)
    # This model's prompt style, over `generate`'s (None: `generate.prompt_template`, `system_prompt`,
    # `few_shot`). A model trained on zero-shot prompts and an instruction model with worked examples
    # can then answer the same items side by side. The target's style also renders every training
    # row's prompt, so the target trains on prompts in the form it is evaluated and served with.
    prompt_template: str | None = None
    system_prompt: str | None = None
    few_shot: list[FewShot] | None = None

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str, info) -> str:
        if info.data.get("endpoint") is not None:
            return value  # the served model's name, checked by the server
        if value.startswith(TINY_PREFIX):
            size = value[len(TINY_PREFIX):]
            if size not in TINY_SIZES:
                raise ValueError(f"unknown tiny model {size!r}; valid: {sorted(TINY_SIZES)}")
            return value
        from lossaverse.pipeline.models.pkgmodels import is_packaged, parse_reference  # deferred: tests patch it

        if is_packaged(value):
            parse_reference(value)  # syntax and alias only: the wheel is fetched when the model is first used
            return value
        if _HF_ID.match(value) and not value.startswith((".", "/", "~")):
            return value  # a hub id; resolved by vLLM / transformers at load time
        path = Path(value).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"model path {value!r} does not exist or has no config.json")
        return str(path.resolve())

    @model_validator(mode="after")
    def _endpoint_declares_size(self) -> "ModelRef":
        if self.endpoint is not None and self.params is None:
            raise ValueError("a model behind an endpoint must declare its size: set `params` (parameter count)")
        return self


class NodeType(Strict):
    """One worker node type of an autoscaling cluster, as in its cluster config's `available_node_types`."""

    resources: dict[str, float]  # of one node: {"CPU": 8, "GPU": 1, "my_resource": 1}
    max_workers: int = Field(ge=0)  # nodes of this type the autoscaler may run at once


class RayConfig(Strict):
    address: str | None = None  # None: start an embedded local Ray; else connect (or RAY_ADDRESS)
    # Logical CPUs for the embedded Ray. More than the 2 physical cores so that Ray Data's map
    # tasks, the vLLM actors and Ray Train workers can be scheduled side by side.
    num_cpus: int = Field(default=6, ge=1)
    object_store_memory: int | None = Field(default=None, ge=78_643_200)
    # The autoscaler's worker node types, for the generation plan check (cluster/plan.py) on a
    # cluster that grows on demand. Read from the cluster where its autoscaler reports them
    # (autoscaler v2, KubeRay); declare them here for one that does not.
    node_types: dict[str, NodeType] = Field(default_factory=dict)
    # output_dir is on storage every node mounts at the same path. Detected for network
    # filesystems (NFS, CephFS, ...); a run on more than one node on any other path is refused.
    shared_storage: bool = False


class BenchmarkConfig(Strict):
    """Where items come from. `source` picks a loader from lossaverse.pipeline.sources.benchmarks.LOADERS."""

    source: str = "synthetic"
    name: str = "arith"
    kind: str = "numeric"  # a key of lossaverse.pipeline.data.kinds.KINDS: numeric | choice | math | exact
    # jsonl/parquet: split -> file path; huggingface: split -> split name of `path`.
    path: str | None = None
    subset: str | None = None
    splits: dict[Literal["train", "eval"], str] = Field(default_factory=lambda: {"train": "train", "eval": "test"})
    # Column mapping: contract column -> column in the source.
    columns: dict[Literal["id", "question", "reference", "choices"], str] = Field(default_factory=dict)
    reference_after: str | None = None  # GSM8K keeps the final answer after "####"
    n_train: int = Field(default=256, ge=1)  # train items per round (synthetic size, or a cap on a real split)
    n_eval: int = Field(default=128, ge=1)
    # Carved from the start of the train split for tuning (`evaluate.split: validation`); these items
    # never generate training data, and the eval split is never used to choose settings.
    n_validation: int = Field(default=0, ge=0)

    @field_validator("kind")
    @classmethod
    def _kind_known(cls, value: str) -> str:
        return kind_of(value).name

    @model_validator(mode="after")
    def _source_known(self) -> "BenchmarkConfig":
        if self.source not in LOADERS:
            raise ValueError(f"unknown benchmark source {self.source!r}; valid: {sorted(LOADERS)}")
        if self.source == "synthetic":
            if self.name not in FAMILIES:
                raise ValueError(f"unknown synthetic benchmark name {self.name!r}; valid: {list(FAMILIES)}")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"benchmark source {self.source!r} needs `path`")
        if self.source in ("jsonl", "parquet"):
            for split, file in self.splits.items():
                if not Path(file).expanduser().is_file():
                    raise ValueError(f"benchmark file for split {split!r} not found: {file}")
        return self


class EngineConfig(Strict):
    """vLLM engine settings, mapped onto ray.data.llm.vLLMEngineProcessorConfig.

    One replica is `tensor_parallel_size * pipeline_parallel_size` placement bundles of
    `num_cpus` CPUs and `num_gpus` GPUs each; `concurrency` replicas run side by side.
    """

    concurrency: int = Field(default=1, ge=1)  # engine replicas
    batch_size: int = Field(default=64, ge=1)
    # Batches Ray Data LLM keeps in flight per replica (its own default, 8): batch_size times this
    # is what one engine is handed at once (lossaverse.pipeline.generation.kvcache sizes its cache for it).
    max_concurrent_batches: int = Field(default=8, ge=1)
    # Sequences the engine runs at once (vLLM's max_num_seqs); None leaves vLLM's default (128 on CPU).
    max_num_seqs: int | None = Field(default=None, ge=1)
    num_cpus: float = Field(default=1, gt=0)  # per bundle
    num_gpus: float = Field(default=0, ge=0)  # per bundle (1 per tensor/pipeline-parallel worker on GPU)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Custom Ray resources per bundle, to pin the engines to the nodes that have them
    # (`ray start --resources '{"big_mem": 1}'`; a fraction lets several bundles share one).
    resources: dict[str, float] = Field(default_factory=dict)
    max_model_len: int = Field(default=256, ge=16)
    dtype: str = "float32"  # CPU: float32 works everywhere; bfloat16 on GPU
    # On CPU this is the share of host memory reserved for the KV cache.
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # KV cache size set explicitly (vLLM's kv_cache_memory_bytes). None on CPU: sized from the
    # model for the sequences the engine runs at once (lossaverse.pipeline.generation.kvcache), because the
    # utilization-based sizing subtracts the engine process's RSS and fails for small shares.
    kv_cache_gib: float | None = Field(default=None, gt=0)
    enforce_eager: bool = False  # skip graph compilation: faster start-up, slower steady state
    # CPU engines: cores vLLM's CPU worker leaves out of its OpenMP pool (VLLM_CPU_NUM_OF_RESERVED_CPU)
    # for the engine's scheduler loop. None keeps vLLM's default, one per worker: on a 2-core machine
    # that runs the model on one core (LLM.generate on SmolLM2: 101 tokens/s against 158 with 0).
    cpu_reserved_cores: int | None = Field(default=None, ge=0)
    # Restarts of one engine replica after a fatal engine error before the job fails naming it
    # (Ray Data's own default restarts forever, so an engine that dies on every batch loops).
    max_restarts: int = Field(default=3, ge=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other vLLM argument

    @property
    def kv_cache_bytes(self) -> int | None:
        """kv_cache_gib in bytes (vLLM's kv_cache_memory_bytes), None where unset."""
        return int(self.kv_cache_gib * 2**30) if self.kv_cache_gib else None

    @property
    def running_seqs(self) -> int:
        """Sequences one engine runs at once: what it is handed (batch_size x max_concurrent_batches),
        at most max_num_seqs (vLLM's CPU default, 128, where unset on CPU)."""
        limit = self.max_num_seqs or self.engine_kwargs.get("max_num_seqs") or (None if self.num_gpus else 128)
        in_flight = self.batch_size * self.max_concurrent_batches
        return min(in_flight, limit) if limit else in_flight

    @property
    def bundles_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def bundle(self) -> dict[str, float]:
        """The Ray resources of one bundle (one tensor/pipeline-parallel worker): CPU, GPU when asked
        for, and the custom resources that pin engines to nodes. The generate stage's engines, Ray
        Serve's replicas and the placement plan all read it here."""
        out = {"CPU": float(self.num_cpus), **{k: float(v) for k, v in self.resources.items()}}
        if self.num_gpus:
            out["GPU"] = float(self.num_gpus)
        return out


class SamplingConfig(Strict):
    samples: int = Field(default=1, ge=1)  # answers per prompt, each its own row
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=32, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None  # None: the run's seed; each (item, sample) gets its own seed from it


class GenerateConfig(Strict):
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig(samples=2, temperature=0.7)
    prompt_template: str | None = None  # None: the template of the benchmark kind
    system_prompt: str | None = None  # chat models only
    few_shot: list[FewShot] = Field(default_factory=list)  # worked examples before each question
    shard_items: int = Field(default=256, ge=1)  # items per answers shard (the unit of resume)
    progress_interval_s: float = Field(default=30.0, gt=0)  # seconds between a running model's progress lines
    # Models whose engines run side by side (the competitors here, the evaluated models in evaluate,
    # each with its own replicas); the rest wait for a wave to finish. None: all at once on GPU
    # engines or a cluster of several nodes, one at a time on one machine's CPU cores
    # (lossaverse.pipeline.generation.generate.engine_waves).
    models_at_once: int | None = Field(default=None, ge=1)


class JudgeConfig(Strict):
    """The supervisory LLM (off by default; see pipeline/marker/judge.py), served like the competitors: a
    vLLM processor, or with `model.endpoint` an OpenAI-compatible chat API. Asked only about rows the
    rules cannot decide, and only whether the extracted answer and the reference are the same (yes/no)."""

    enabled: bool = False
    model: ModelRef | None = None
    engine: EngineConfig = EngineConfig()  # vLLM engine (ignored for an endpoint)
    max_chars: int = Field(default=200, ge=8, le=1000)  # the longest candidate answer ever shown to it

    @model_validator(mode="after")
    def _model_given(self) -> "JudgeConfig":
        if self.enabled and self.model is None:
            raise ValueError("the judge needs `model` (a Hugging Face id, a directory, tiny:<size>, or an endpoint)")
        if self.model is not None and self.model.endpoint is not None and self.model.endpoint.api != "chat":
            raise ValueError("a judge endpoint must use `api: chat` (its answer is constrained with response_format)")
        return self


class MarkConfig(Strict):
    batch_size: int = Field(default=1024, ge=1)
    math_timeout_s: int = Field(default=5, ge=1)  # math-verify's parse and verify timeouts, each
    # datasets/kto: for items no competitor got right, add the reference answer as a desirable row
    # (competitor `reference`).
    kto_reference_rows: bool = False
    judge: JudgeConfig = JudgeConfig()


class DatasetsConfig(Strict):
    """How datasets/ is built from the marked answers (pipeline/data/build.py, pipeline/data/divergence.py)."""

    # datasets/kto: move the token prefix a wrong answer shares with a right answer to the same
    # prompt into the prompt, so KTO penalises only the tokens from where it goes wrong (the
    # target's tokenizer; stats.json counts the penalised tokens before and after).
    divergent_negatives: bool = False




class EvaluateConfig(Strict):
    sampling: SamplingConfig = SamplingConfig()  # greedy, one sample
    # `validation` (benchmark.n_validation items carved from train) while tuning; `eval` for the result.
    split: Literal["eval", "validation"] = "eval"
    # A second benchmark the target is never trained on (its eval split): transfer, or damage.
    transfer: BenchmarkConfig | None = None
    # How many vLLM engines answer the evaluated models:
    # - `reload`: one engine of the untrained target; each model's full weights are loaded into it
    #   in turn (vLLM's in-place reload, 0.4 s for SmolLM2-135M against a 25-30 s engine start on CPU);
    # - `lora`: one engine of the untrained target with `enable_lora`; each LoRA-trained model is
    #   its adapters (a chain of them stacked into one), all models' requests in the same batches;
    # - `per_model`: one engine each;
    # - `auto` (the default): `lora` on GPU engines, `reload` on CPU, where vLLM 0.32's LoRA kernels
    #   (torch ops that copy each token's adapter weights) ran SmolLM2's five evaluated models at
    #   under 10 tokens/s together, against about 240 for one merged model.
    # Where the chosen way cannot take every model (one trained without LoRA, one of another
    # architecture or tokenizer), one engine per model; manifest.json says which and why.
    engines: Literal["auto", "reload", "lora", "per_model"] = "auto"
    # With the recipe: also score the SFT run's curve points (train.sft_curve, recipe/sft_curve/),
    # as `lossaverse tune` does on the validation items to show where SFT stops gaining.
    sft_curve: bool = False
    # false: the untrained target and train.method's model alone, not the compared methods (nor the
    # recipe's SFT step): tune's trials that share the run's baselines, scored once in `configured`.
    baselines: bool = True



def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides; values are parsed as YAML (`3` is an int, `[a, b]` a list)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example generate.sampling.samples=4")
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data

