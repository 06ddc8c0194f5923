"""Run configuration: one YAML file, one pydantic model per stage, composed into `RunConfig`.

Every model forbids unknown keys, so a typo is an error that names the field. Defaults live here
and nowhere else. `load_config(path, overrides)` applies `--set a.b=c` overrides before validation,
so an override is checked exactly like a value written in the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TINY_PREFIX = "tiny:"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EndpointConfig(_Strict):
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


class FewShot(_Strict):
    question: str
    answer: str


class ModelRef(_Strict):
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
            from pipeline.tinymodels import TINY_SIZES

            size = value[len(TINY_PREFIX):]
            if size not in TINY_SIZES:
                raise ValueError(f"unknown tiny model {size!r}; valid: {sorted(TINY_SIZES)}")
            return value
        from pipeline.pkgmodels import is_packaged, parse_reference

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


class NodeType(_Strict):
    """One worker node type of an autoscaling cluster, as in its cluster config's `available_node_types`."""

    resources: dict[str, float]  # of one node: {"CPU": 8, "GPU": 1, "my_resource": 1}
    max_workers: int = Field(ge=0)  # nodes of this type the autoscaler may run at once


class RayConfig(_Strict):
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


class BenchmarkConfig(_Strict):
    """Where items come from. `source` picks a loader from pipeline.benchmarks.LOADERS."""

    source: str = "synthetic"
    name: str = "arith"
    kind: Literal["numeric", "choice", "math", "exact"] = "numeric"
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

    @model_validator(mode="after")
    def _source_known(self) -> "BenchmarkConfig":
        from pipeline.benchmarks import LOADERS

        if self.source not in LOADERS:
            raise ValueError(f"unknown benchmark source {self.source!r}; valid: {sorted(LOADERS)}")
        if self.source == "synthetic":
            from pipeline.synthetic import FAMILIES

            if self.name not in FAMILIES:
                raise ValueError(f"unknown synthetic benchmark name {self.name!r}; valid: {list(FAMILIES)}")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"benchmark source {self.source!r} needs `path`")
        if self.source in ("jsonl", "parquet"):
            for split, file in self.splits.items():
                if not Path(file).expanduser().is_file():
                    raise ValueError(f"benchmark file for split {split!r} not found: {file}")
        return self


class EngineConfig(_Strict):
    """vLLM engine settings, mapped onto ray.data.llm.vLLMEngineProcessorConfig.

    One replica is `tensor_parallel_size * pipeline_parallel_size` placement bundles of
    `num_cpus` CPUs and `num_gpus` GPUs each; `concurrency` replicas run side by side.
    """

    concurrency: int = Field(default=1, ge=1)  # engine replicas
    batch_size: int = Field(default=64, ge=1)
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
    # KV cache size set explicitly (vLLM's kv_cache_memory_bytes); on CPU set it, because the
    # utilization-based sizing subtracts the engine process's RSS and fails for small shares.
    kv_cache_gib: float | None = Field(default=None, gt=0)
    enforce_eager: bool = False  # skip graph compilation: faster start-up, slower steady state
    # Restarts of one engine replica after a fatal engine error before the job fails naming it
    # (Ray Data's own default restarts forever, so an engine that dies on every batch loops).
    max_restarts: int = Field(default=3, ge=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other vLLM argument

    @property
    def bundles_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class SamplingConfig(_Strict):
    samples: int = Field(default=1, ge=1)  # answers per prompt, each its own row
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=32, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None  # None: the run's seed; each (item, sample) gets its own seed from it


class GenerateConfig(_Strict):
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig(samples=2, temperature=0.7)
    prompt_template: str | None = None  # None: the template of the benchmark kind
    system_prompt: str | None = None  # chat models only
    few_shot: list[FewShot] = Field(default_factory=list)  # worked examples before each question
    shard_items: int = Field(default=256, ge=1)  # items per answers shard (the unit of resume)
    progress_interval_s: float = Field(default=10.0, gt=0)


class JudgeConfig(_Strict):
    """The supervisory LLM (off by default; see pipeline/judge.py), served like the competitors: a
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


class MarkConfig(_Strict):
    batch_size: int = Field(default=1024, ge=1)
    math_timeout_s: int = Field(default=5, ge=1)  # math-verify's parse and verify timeouts, each
    # datasets/kto: for items no competitor got right, add the reference answer as a desirable row
    # (competitor `reference`).
    kto_reference_rows: bool = False
    judge: JudgeConfig = JudgeConfig()


class DatasetsConfig(_Strict):
    """How datasets/ is built from the marked answers (pipeline/build.py, pipeline/divergence.py)."""

    # datasets/kto: move the token prefix a wrong answer shares with a right answer to the same
    # prompt into the prompt, so KTO penalises only the tokens from where it goes wrong (the
    # target's tokenizer; stats.json counts the penalised tokens before and after).
    divergent_negatives: bool = False


class LoraSettings(_Strict):
    """LoRA adapters (peft): only they are trained; the reference is the base with adapters off."""

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class OnPolicyConfig(_Strict):
    """How the SFT'd target answers fresh train items in `recipe: sft_then_kto`."""

    samples: int = Field(default=4, ge=1)  # answers per item: right and wrong ones to the same prompt
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    # Items: this many fresh train items from a block of the train split that no round answers
    # (after the validation items and the `rounds.count` rounds' blocks); None: benchmark.n_train.
    items: int | None = Field(default=None, ge=1)


class TrainConfig(_Strict):
    """Training: method, loss settings, optimizer and step budget (shared by every method), reference
    model, scale (Ray Train + DeepSpeed), checkpoints and metrics. See training/ for the code."""

    method: str = "kto"  # a key of training.methods.METHODS: kto | dpo | sft
    # `single`: `method` alone. `sft_then_kto`: SFT on the desirable rows for `sft_steps`, the SFT'd
    # target answers fresh train items (`on_policy`, graded by the same marker), then KTO from the
    # SFT checkpoint (its reference is the SFT model) on those answers plus the competitors' for
    # `max_steps`. Compared methods get the recipe's whole budget (sft_steps + max_steps).
    recipe: Literal["single", "sft_then_kto"] = "single"
    sft_steps: int = Field(default=256, ge=1)
    on_policy: OnPolicyConfig = OnPolicyConfig()
    # KTO plus nll_weight x the SFT loss of its desirable rows (training/kto_nll.py); 0: plain KTO.
    nll_weight: float = Field(default=0.0, ge=0)
    # Baselines trained beside `method` on the same round's data with the same step budget, each
    # evaluated against the untrained target (`lossaverse run --compare kto,dpo,sft`).
    compare: list[str] = Field(default_factory=list)
    beta: float = Field(default=0.1, gt=0)  # KTO / DPO: strength of the implicit KL penalty
    # KTO's lambda_D / lambda_U. `fixed`: as given (or undesirable = loss_aversion * desirable);
    # `auto`: from datasets/stats.json so that lambda_D*n_D/(lambda_U*n_U) is in [1, 4/3].
    weights: Literal["fixed", "auto"] = "fixed"
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)
    loss_aversion: float | None = Field(default=None, gt=0)  # lambda_U / lambda_D
    # Optimizer and budget: the same for every method, so baselines compare like for like.
    learning_rate: float = Field(default=5e-5, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)  # overrides epochs when set
    # KTO's KL reference point pairs each prompt with another completion of the same micro-batch.
    per_device_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=256, ge=8)
    gradient_checkpointing: bool = False  # memory: recompute activations in the backward pass
    # Reference model: a frozen copy (default), log-probs computed once before training (no copy in
    # memory), or with `lora` the base model with the adapters switched off.
    precompute_ref_log_probs: bool = False
    lora: LoraSettings | None = None
    # Scale: one Ray Train worker per GPU (or CPU slot); DeepSpeed ZeRO by name or a JSON file.
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False  # bf16 on GPU, fp32 on CPU
    gpus_per_worker: float = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # SPREAD: over nodes
    deepspeed: str = "zero2"  # zero2 | zero3 | zero3_offload | none (DDP) | path/to/config.json
    memory_per_worker_gib: float | None = Field(default=None, gt=0)  # memory: checked before training
    # Checkpoints (Ray Train storage under the run directory) and recovery from failed workers.
    checkpoint_every: int = Field(default=50, ge=0)  # steps; 0 = none
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=-1)  # worker-group restarts from the last checkpoint
    resume: bool = Field(default=False, exclude=True)  # set by `lossaverse train --resume`
    # Metrics: every `logging_steps` to the console, manifest.json and, if asked, TensorBoard.
    logging_steps: int = Field(default=1, ge=1)
    report_to: list[Literal["tensorboard"]] = Field(default_factory=list)

    @field_validator("method")
    @classmethod
    def _method_known(cls, value: str) -> str:
        from training.methods import get_method

        get_method(value)
        return value

    @field_validator("compare")
    @classmethod
    def _compare_known(cls, value: list[str]) -> list[str]:
        from training.methods import get_method

        for method in value:
            get_method(method)
        if len(set(value)) != len(value):
            raise ValueError(f"compare lists a method twice: {value}")
        return value

    @property
    def methods(self) -> list[str]:
        """`method` first (its model is the run's `model/`), then the other compared methods."""
        return [self.method] + [m for m in self.compare if m != self.method]

    def for_method(self, method: str) -> "TrainConfig":
        """These settings with `method` trained (optimizer, budget and scale shared)."""
        return self.model_copy(update={"method": method, "compare": []})

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_known(cls, value: str) -> str:
        from training.zero import deepspeed_config

        deepspeed_config(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        from training.zero import deepspeed_config, deepspeed_conflicts

        if self.recipe == "sft_then_kto":
            if self.method != "kto":
                raise ValueError(f"recipe sft_then_kto trains KTO after SFT; set train.method: kto (not {self.method!r})")
            if self.max_steps is None:
                raise ValueError("recipe sft_then_kto needs train.max_steps (the KTO steps after the sft_steps of SFT), "
                                 "so that compared methods get the same total budget")
        if "kto" in self.methods and self.per_device_batch_size < 2:
            raise ValueError(
                "KTO needs a per-device batch of at least 2 (its KL reference point pairs each "
                "prompt with another completion in the micro-batch); set train.per_device_batch_size >= 2"
            )
        explicit = self.model_fields_set & {"desirable_weight", "undesirable_weight"}
        if self.weights == "auto" and explicit:
            raise ValueError(f"weights: auto sets desirable_weight and undesirable_weight from the data; remove {sorted(explicit)} or use weights: fixed")
        if self.weights == "fixed" and self.loss_aversion is not None and "undesirable_weight" in explicit:
            raise ValueError("set loss_aversion (undesirable = loss_aversion x desirable_weight) or undesirable_weight, not both")
        if self.use_gpu and self.deepspeed == "none":
            raise ValueError(
                "train.deepspeed: none with train.use_gpu trains bf16 weights with no fp32 master copy, so at small "
                "learning rates most AdamW updates round to zero; use deepspeed: zero2 (DeepSpeed keeps fp32 master "
                "weights) or train on CPU (fp32)"
            )
        ds = deepspeed_config(self.deepspeed)
        if ds is not None:
            conflicts = deepspeed_conflicts(
                ds, micro_batch=self.per_device_batch_size, grad_accum=self.gradient_accumulation_steps,
                workers=self.num_workers, use_gpu=self.use_gpu, learning_rate=self.learning_rate,
                max_grad_norm=self.max_grad_norm,
            )
            if conflicts:
                raise ValueError(f"DeepSpeed config {self.deepspeed!r} contradicts the trainer: " + "; ".join(conflicts))
        return self


class EvaluateConfig(_Strict):
    sampling: SamplingConfig = SamplingConfig()  # greedy, one sample
    # `validation` (benchmark.n_validation items carved from train) while tuning; `eval` for the result.
    split: Literal["eval", "validation"] = "eval"
    # A second benchmark the target is never trained on (its eval split): transfer, or damage.
    transfer: BenchmarkConfig | None = None


class RoundsConfig(_Strict):
    """Repeated play: generate, mark, train and evaluate `count` times. From round 2 on, the target
    trained in the round before replaces the `small` competitor (`replace_small`) or answers beside
    both competitors as a third player (`join`); each round answers fresh train items and trains
    the target afresh from its base on the datasets of every round so far (rows tagged by round)."""

    count: int = Field(default=1, ge=1)
    policy: Literal["replace_small", "join"] = "replace_small"
    # Stop after a round whose trained target is not better than the round before's (the 95% CI of
    # the paired difference on the eval items includes zero or lies below it).
    stop_when_no_gain: bool = False


class ServeConfig(_Strict):
    """`lossaverse serve`: the trained target behind an OpenAI-compatible API (ray.serve.llm),
    optionally the untrained target beside it for A/B, and the marker at `POST /mark`.

    The engine is the target's (`generate.engine` with `target.engine` on top) with `engine` on top
    of that; `concurrency` and `batch_size` are Ray Data settings and do not apply to serving.
    """

    model_id: str = Field(default="target", pattern=r"^[A-Za-z0-9][\w.:-]*$")  # the `model` clients name
    base_model_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.:-]*$")  # A/B: the untrained target
    host: str = "127.0.0.1"  # 0.0.0.0 to take requests from other machines
    port: int = Field(default=8000, ge=1, le=65535)
    min_replicas: int = Field(default=1, ge=0)  # per model; 0 lets an idle model scale to zero
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: int = Field(default=8, ge=1)  # autoscaling: in-flight requests per replica
    engine: dict[str, Any] = Field(default_factory=dict)  # engine settings over the target's
    # The HTTP ingress and the marker are light; a fraction of a CPU keeps them schedulable when the
    # engines hold every whole logical CPU.
    ingress_num_cpus: float = Field(default=0.25, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)  # cap on a request's max_tokens; None: max_model_len // 2
    # Caps on what one request may multiply: sequences per prompt (n, best_of), prompts in one
    # list-valued `prompt`, and log-probabilities per token; above them a 400 names the field.
    max_n: int = Field(default=4, ge=1)
    max_prompts: int = Field(default=16, ge=1)
    max_logprobs: int = Field(default=5, ge=0)
    # Name of the environment variable holding the API key; set, every request to the model API
    # and to /mark needs `Authorization: Bearer <key>` (else 401). None: no authentication.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_body_bytes: int = Field(default=1_048_576, ge=1024)  # larger request bodies get 413
    marker: bool = True  # also serve POST /mark
    max_mark_answers: int = Field(default=1000, ge=1)  # answers per /mark request

    @model_validator(mode="after")
    def _replicas_ordered(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.base_model_id is not None and self.base_model_id == self.model_id:
            raise ValueError(f"base_model_id must differ from model_id ({self.model_id!r})")
        return self


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)


class SubmitConfig(_Strict):
    """`lossaverse submit`: the Ray Jobs runtime environment. The cluster's image (Dockerfile)
    carries the pinned dependencies; the job uploads the current directory (this project) as its
    working_dir, so the code and configs that run are the ones submitted."""

    excludes: list[str] = Field(
        default_factory=lambda: [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"]
    )
    env_vars: dict[str, str] = Field(default_factory=dict)  # plain settings; secrets come from the cluster
    entrypoint_num_cpus: float = Field(default=0, ge=0)  # CPUs reserved for the job's driver process

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        leaked = sorted(k for k in value if _SECRET_NAME.search(k))
        if leaked:
            raise ValueError(
                f"{leaked} look like secrets; a job's env_vars are stored in the clear by the Jobs API: "
                "give them to the cluster's pods as Kubernetes secrets instead"
            )
        return value


class RunConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    seed: int = 0
    output_dir: str = "runs"
    ray: RayConfig = RayConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    competitors: dict[Literal["large", "small"], ModelRef]
    target: ModelRef
    generate: GenerateConfig = GenerateConfig()
    mark: MarkConfig = MarkConfig()
    datasets: DatasetsConfig = DatasetsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    rounds: RoundsConfig = RoundsConfig()
    # The round this config describes: set by the rounds loop (cluster.stages.execute_rounds).
    round: int = Field(default=1, ge=1)
    serve: ServeConfig = ServeConfig()
    submit: SubmitConfig = SubmitConfig()

    @field_validator("rounds", mode="before")
    @classmethod
    def _rounds_count(cls, value: Any) -> Any:
        return {"count": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("competitors")
    @classmethod
    def _both_competitors(cls, value: dict) -> dict:
        missing = {"large", "small"} - set(value)
        if missing:
            raise ValueError(f"competitors needs both `large` and `small`; missing {sorted(missing)}")
        return value

    @model_validator(mode="after")
    def _competitor_engines(self) -> "RunConfig":
        for name, ref in self.competitors.items():
            try:
                self.engine_for(ref)
            except ValidationError as exc:
                e = exc.errors()[0]
                field = ".".join(str(p) for p in e["loc"])
                raise ValueError(f"competitors.{name}.engine.{field}: {e['msg']}") from None
        return self

    def style_for(self, ref: ModelRef | None = None) -> dict:
        """`ref`'s prompt style: its own `prompt_template`, `system_prompt` and `few_shot`, each
        falling back to `generate`'s (`generate`'s alone without `ref`); as keyword arguments of
        pipeline.generate.PromptStyle."""
        g = self.generate

        def own(field: str, default):
            value = getattr(ref, field) if ref is not None else None
            return value if value is not None else default

        return {
            "template": own("prompt_template", g.prompt_template),
            "system_prompt": own("system_prompt", g.system_prompt),
            "few_shot": tuple((s.question, s.answer) for s in own("few_shot", g.few_shot)),
        }

    def engine_for(self, ref: ModelRef) -> EngineConfig:
        """`generate.engine` with the model's own engine settings on top."""
        if not ref.engine:
            return self.generate.engine
        return EngineConfig.model_validate({**self.generate.engine.model_dump(), **ref.engine})

    @model_validator(mode="after")
    def _round_in_range(self) -> "RunConfig":
        if self.round > self.rounds.count:
            raise ValueError(f"round {self.round} is past rounds.count {self.rounds.count}")
        if self.evaluate.split == "validation" and self.benchmark.n_validation == 0:
            raise ValueError("evaluate.split: validation needs validation items: set benchmark.n_validation")
        return self

    @property
    def top_dir(self) -> Path:
        """The run's directory (round 1's outputs, the rounds summary, the report)."""
        return Path(self.output_dir).expanduser() / self.name

    def round_dir(self, k: int) -> Path:
        """Round k's outputs: round 1 at the top of the run directory, round k >= 2 under rounds/k/."""
        return self.top_dir if k == 1 else self.top_dir / "rounds" / str(k)

    def at_round(self, k: int) -> "RunConfig":
        return self.model_copy(update={"round": k})

    @property
    def run_dir(self) -> Path:
        """This round's directory (the top of the run directory for round 1)."""
        return self.round_dir(self.round)


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


def _format_errors(where: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}" if field else msg)
    return f"config error in {where}: " + "; ".join(parts)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raise ConfigError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error in {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config error in {path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(str(path), exc)) from None
