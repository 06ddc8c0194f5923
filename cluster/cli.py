"""The `lossaverse` command line: each command loads a config, runs stages, reports."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lossaverse.cluster.summary import summary_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Turn a benchmark into an aligned model.")
# Lines are never wrapped (a log or CI reads them whole); tables get 100 columns off a terminal.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 100)
err = Console(stderr=True, highlight=False, soft_wrap=True)
VERBOSE: dict = {"on": False}


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="Show Ray's, Ray Data's, vLLM's and DeepSpeed's own output on the console "
                                               "(by default it goes to <run>/logs/)")):
    VERBOSE["on"] = verbose

SetOpt = typer.Option([], "--set", help="Override a config value: --set generate.sampling.samples=4")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
ForceOpt = typer.Option(False, "--force", help="Re-run stages even if their outputs are complete")


def _execute(config: Path, overrides: list[str], stages: list[str], force: bool, address: Optional[str]):
    from lossaverse.cluster.config import load_config  # deferred: keeps `lossaverse --help` light
    from lossaverse.cluster.logs import library_logs  # deferred: keeps `lossaverse --help` light
    from lossaverse.cluster.progress import bars  # deferred: keeps `lossaverse --help` light
    from lossaverse.cluster.rounds import run_stages  # deferred: imports pandas
    from lossaverse.pipeline.data.rundir import lock_run_dir  # deferred: keeps `lossaverse --help` light

    cfg = load_config(config, overrides)  # fails before any work starts
    lock_run_dir(cfg.run_dir)  # a second driver on this run directory is refused before Ray starts
    start = time.perf_counter()
    with library_logs(cfg.top_dir, VERBOSE["on"], consoles=(err,), outs=(console,)), \
            bars(console, console.is_terminal and not VERBOSE["on"]):
        run_stages(cfg, stages, force=force, report=console.print, address=address)
    return cfg, time.perf_counter() - start


def _guard(fn):
    """Turn the errors a user can fix into one line on stderr and exit code 2."""
    from lossaverse.cluster.config import ConfigError  # deferred: keeps `lossaverse --help` light
    from lossaverse.cluster.stages import StageError  # deferred: imports pandas
    from lossaverse.cluster.submit import SubmitError  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.data.rundir import RunDirLocked  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.data.schemas import SchemaError  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.generation.processors import EngineFailed  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.report.export import ExportError  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.sources.benchmarks import BenchmarkError  # deferred: keeps `lossaverse --help` light
    from lossaverse.training.train import WorkersUnplaced  # deferred: keeps `lossaverse --help` light

    try:
        return fn()
    except (ConfigError, StageError, BenchmarkError, SchemaError, SubmitError, RunDirLocked, EngineFailed, ExportError,
            WorkersUnplaced, FileNotFoundError) as exc:
        from lossaverse.cluster.logs import last_log  # deferred: keeps `lossaverse --help` light

        err.print(f"[red]error:[/] {exc}")
        if last_log() is not None:
            err.print(f"the libraries' own output (Ray, vLLM, DeepSpeed): {last_log()}")
        raise typer.Exit(2) from None


def _command(config: Path, overrides: list[str], stages: list[str], force: bool, address: Optional[str]) -> None:
    def go():
        cfg, seconds = _execute(config, overrides, stages, force, address)
        console.print(summary_table(cfg.run_dir))
        console.print(f"run directory: {cfg.run_dir.resolve()}  ({seconds:.0f}s)")

    _guard(go)


CompareOpt = typer.Option(None, "--compare", help="Train these methods side by side on the same data and budget, e.g. kto,dpo,sft")


@app.command()
def run(config: Path, set: list[str] = SetOpt, force: bool = ForceOpt, address: Optional[str] = AddressOpt,
        compare: Optional[str] = CompareOpt):
    """Every stage: items, generate, mark, datasets, train, evaluate (`rounds.count` times)."""
    from lossaverse.cluster.stages import STAGE_NAMES  # deferred: imports pandas

    _command(config, set + _compare_set(compare), STAGE_NAMES, force, address)


def _compare_set(compare: Optional[str]) -> list[str]:
    """--compare kto,dpo,sft -> the override train.compare=[kto, dpo, sft]."""
    if compare is None:
        return []
    methods = [m.strip() for m in compare.split(",") if m.strip()]
    return [f"train.compare=[{', '.join(methods)}]"]


@app.command()
def generate(config: Path, set: list[str] = SetOpt, force: bool = ForceOpt, address: Optional[str] = AddressOpt):
    """Load the benchmark and let both competitors answer its train split."""
    _command(config, set, ["items", "generate"], force, address)


@app.command()
def mark(
    config: Optional[Path] = typer.Argument(None),
    set: list[str] = SetOpt,
    force: bool = ForceOpt,
    address: Optional[str] = AddressOpt,
    answers: Optional[Path] = typer.Option(None, "--answers", help="Mark this answers Parquet (file or folder) instead of a run's"),
    out: Optional[Path] = typer.Option(None, "--out", help="With --answers: where marked/ and datasets/ go"),
):
    """Mark the answers right or wrong and build the kto / negatives / pairs datasets."""
    if answers is None:
        if config is None:
            err.print("[red]error:[/] give a CONFIG, or --answers PATH --out DIR to mark answers produced elsewhere")
            raise typer.Exit(2)
        _command(config, set, ["mark", "datasets"], force, address)
        return

    def go():
        from lossaverse.cluster.config import MarkConfig, RayConfig  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.ray_env import init_ray, shutdown_ray  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.stages import build_dataset_dir, mark_answers  # deferred: imports pandas

        if out is None:
            raise FileNotFoundError("--answers needs --out DIR for the marked rows and datasets")
        if not answers.exists():
            raise FileNotFoundError(f"answers not found: {answers}")
        console.print(init_ray(RayConfig(), address))
        try:
            info = mark_answers(answers, out / "marked", MarkConfig().batch_size)
            info.update(build_dataset_dir(out / "marked", out / "datasets"))
        finally:
            shutdown_ray()
        console.print(summary_table(out))
        console.print(f"marked {info['rows']} rows into {out.resolve()}")

    _guard(go)


@app.command()
def train(
    config: Path,
    set: list[str] = SetOpt,
    force: bool = ForceOpt,
    address: Optional[str] = AddressOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training run from its last checkpoint"),
):
    """Align the target with train.method (kto, or the dpo / sft baselines): Ray Train + DeepSpeed + TRL."""
    _command(config, [*set, "train.resume=true"] if resume else set, ["train"], force, address)


@app.command()
def evaluate(config: Path, set: list[str] = SetOpt, force: bool = ForceOpt, address: Optional[str] = AddressOpt):
    """The target, before and after training, on the eval split through the same generate and mark."""
    _command(config, set, ["evaluate"], force, address)


@app.command()
def tune(
    config: Path,
    grid: list[str] = typer.Option(..., "--grid", help="Values to try: --grid train.learning_rate=1e-4,1e-3 (repeat for a product)"),
    set: list[str] = SetOpt,
    address: Optional[str] = AddressOpt,
):
    """Choose training settings on the validation items (benchmark.n_validation), never on eval."""

    def go():
        from lossaverse.cluster.config import load_config  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.logs import library_logs  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.ray_env import init_ray, shutdown_ray  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.tune import parse_grid  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.tune import tune as run_tune  # deferred: keeps `lossaverse --help` light

        parsed = parse_grid(grid)
        cfg = load_config(config, set)
        from lossaverse.cluster.progress import bars  # deferred: keeps `lossaverse --help` light

        with library_logs(cfg.top_dir, VERBOSE["on"], consoles=(err,), outs=(console,)), \
                bars(console, console.is_terminal and not VERBOSE["on"]):  # tune/ holds only trials
            console.print(init_ray(cfg.ray, address, output_dir=cfg.top_dir))
            try:
                out = run_tune(config, set, parsed, report=console.print)
            finally:
                shutdown_ray()
        from lossaverse.cluster.summary import tune_table  # deferred: keeps `lossaverse --help` light

        console.print(tune_table(out))
        console.print("best: " + (" ".join(f"--set {s}" for s in out["best"]) or "the config as it is"))
        if curve := out.get("sft_curve"):
            points = ", ".join(f"{p['step']}: {100 * p['accuracy']:.1f}%" for p in curve["points"])
            console.print(f"SFT's validation curve (steps: accuracy) {points}; it stopped gaining at step "
                          f"{curve['stopped_gaining_at']}, and the recipe's KTO starts at step {curve['sft_steps']} (train.sft_steps)")
        console.print(f"trials: {cfg.top_dir / 'tune.json'}")

    _guard(go)


@app.command()
def check(config: Path, set: list[str] = SetOpt):
    """Validate a config without running anything."""

    def go():
        from lossaverse.cluster.config import load_config  # deferred: keeps `lossaverse --help` light

        cfg = load_config(config, set)
        console.print(f"ok: {config} (run directory {cfg.run_dir})")

    _guard(go)


def _numbers(text: str, what: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected comma-separated numbers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what}: expected positive numbers, got {text!r}")
    return sorted(set(values))


@app.command()
def bench(
    stage: str = typer.Argument(..., help="generate, mark, train, all, or gpu (the training step on one GPU, no Ray)"),
    config: Optional[Path] = typer.Argument(None, help="the run config (every stage but gpu)"),
    set: list[str] = SetOpt,
    address: Optional[str] = AddressOpt,
    replicas: str = typer.Option("1,2,4", "--replicas", help="generate: engine replica counts to sweep"),
    workers: str = typer.Option("1,2", "--workers", help="train: Ray Train worker counts to sweep"),
    rows: str = typer.Option("1e4,1e5", "--rows", help="mark: row counts to sweep"),
    steps: Optional[int] = typer.Option(None, "--steps", min=3,
                                        help="train: optimizer steps per run, default 100 (the first 5 are warm-up); gpu: per run"),
    size: str = typer.Option("tiny", "--size", help="gpu: the model size (tiny runs on CPU in seconds; 0.5b, ...)"),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="gpu: dense bf16 peak, if the device is not known"),
    prompts: Optional[int] = typer.Option(None, "--prompts", min=1,
                                          help="generate: prompts per engine replica (default: 8 rounds of the batches in flight)"),
    repeats: int = typer.Option(1, "--repeats", help="repetitions per measurement (median and spread)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where bench.json and the plot go (default runs/<name>/bench)"),
    cost_prompts: int = typer.Option(10_000, "--cost-prompts", help="cost model: prompts of the job to size"),
    cost_samples: int = typer.Option(4, "--cost-samples", help="cost model: answers per prompt"),
    cost_replicas: int = typer.Option(8, "--cost-replicas", help="cost model: engine replicas"),
):
    """Benchmark stages against their plain baselines in one run; write bench.json and a scaling plot."""
    from lossaverse.cluster.bench import STAGES  # deferred: keeps `lossaverse --help` light

    if stage not in (*STAGES, "all", "gpu"):
        err.print(f"[red]error:[/] unknown bench stage {stage!r}; valid: {', '.join((*STAGES, 'all', 'gpu'))}")
        raise typer.Exit(2)
    if stage == "gpu":  # torch, transformers, TRL and peft only: a GPU machine's bare Python runs it
        from lossaverse.training.gpubench import main as gpu_main  # deferred: keeps `lossaverse --help` light

        if out is None:
            err.print("[red]error:[/] bench gpu needs --out DIR (for gpubench.json)")
            raise typer.Exit(2)
        gpu_main(["--size", size, "--out", str(out)] + (["--steps", str(steps)] if steps else [])
                 + (["--peak-tflops", str(peak_tflops)] if peak_tflops else []))
        return
    if steps is not None and steps < 10:
        err.print(f"[red]error:[/] --steps {steps}: bench {stage} needs at least 10 (the first 5 are warm-up)")
        raise typer.Exit(2)
    if config is None:
        err.print(f"[red]error:[/] bench {stage} needs the run config: lossaverse bench {stage} configs/local.yaml")
        raise typer.Exit(2)
    stages = list(STAGES) if stage == "all" else [stage]
    sweep_r, sweep_w, sweep_rows = _numbers(replicas, "--replicas"), _numbers(workers, "--workers"), _numbers(rows, "--rows")

    def go():
        from lossaverse.cluster.bench import bench_table, run_bench  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.config import load_config  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.ray_env import init_ray, shutdown_ray  # deferred: keeps `lossaverse --help` light

        cfg = load_config(config, set)
        target = out or cfg.run_dir / "bench"
        if {"generate", "train"}.intersection(stages):
            console.print(init_ray(cfg.ray, address))
        try:
            result = run_bench(cfg, stages, target, sweep_r, sweep_w, sweep_rows, prompts, repeats,
                               (cost_prompts, cost_samples, cost_replicas), console.print, train_steps=steps or 100)
        finally:
            shutdown_ray()
        console.print(bench_table(result))
        console.print(f"bench.json and bench_scaling.png in {target.resolve()}  ({result['seconds']:.0f}s)")

    _guard(go)


@app.command()
def serve(
    target: Path = typer.Argument(..., help="A run config (serves its <run_dir>/model) or a model directory"),
    set: list[str] = SetOpt,
    address: Optional[str] = AddressOpt,
    base: Optional[str] = typer.Option(None, "--base", help="With a MODEL_DIR: also serve this model (directory, hub id, tiny:SIZE) for A/B"),
):
    """Serve the trained target behind an OpenAI-compatible API (Ray Serve LLM), and the marker at POST /mark."""

    def go():
        from lossaverse.cluster.serve import plan_for, serve_until_stopped  # deferred: keeps `lossaverse --help` light
        from lossaverse.serving.model import describe  # deferred: keeps `lossaverse --help` light

        plan = plan_for(target, base, set)  # every check before anything starts
        for line in describe(plan):
            console.print(line)
        serve_until_stopped(plan, address, console.print)

    _guard(go)


JobAddressOpt = typer.Option(None, "--address", help="The cluster's Ray dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")


def _final(job_id: str, details) -> None:
    status = details.status.value
    console.print(f"job {job_id}: {status}" + (f" ({details.message})" if details.message and status != "SUCCEEDED" else ""))
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@app.command()
def submit(
    config: Path,
    set: list[str] = SetOpt,
    address: Optional[str] = JobAddressOpt,
    command: str = typer.Option("run", "--command", help="What the job runs: lossaverse run | generate | mark | train | evaluate | check"),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return at once"),
):
    """Run CONFIG on a Ray cluster through the Ray Jobs API: stream the logs, print the job id and final status."""

    def go():
        from lossaverse.cluster import submit as jobs  # deferred: keeps `lossaverse --help` light
        from lossaverse.cluster.config import load_config  # deferred: keeps `lossaverse --help` light

        cfg = load_config(config, set)  # a bad config fails here, before anything is uploaded
        jc = jobs.client(address)
        job_id = jobs.submit(jc, cfg, command, config, set, Path.cwd())
        console.print(f"submitted job {job_id}")
        if no_wait:
            console.print(f"follow it with: lossaverse jobs logs {job_id} --follow --address ...")
            return
        try:
            details = jobs.follow(jc, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        except KeyboardInterrupt:
            err.print(f"stopped following; the job goes on. Stop it with: lossaverse jobs stop {job_id}")
            raise typer.Exit(130) from None
        _final(job_id, details)

    _guard(go)


jobs_app = typer.Typer(no_args_is_help=True, help="Jobs submitted to a Ray cluster: status, logs, stop.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status")
def jobs_status(job_id: str, address: Optional[str] = JobAddressOpt):
    """The job's status, message and entrypoint."""

    def go():
        from lossaverse.cluster import submit as jobs  # deferred: keeps `lossaverse --help` light

        d = jobs.info(jobs.client(address), job_id)
        console.print(f"{job_id}: {d.status.value}")
        console.print(f"entrypoint: {d.entrypoint}", markup=False)
        if d.message:
            console.print(f"message: {d.message}", markup=False)

    _guard(go)


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: Optional[str] = JobAddressOpt, follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends")):
    """The job's logs so far (or, with --follow, until it ends)."""

    def go():
        from lossaverse.cluster import submit as jobs  # deferred: keeps `lossaverse --help` light

        jc = jobs.client(address)
        if follow:
            _final(job_id, jobs.follow(jc, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush())))
        else:
            sys.stdout.write(jobs.logs(jc, job_id))

    _guard(go)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: Optional[str] = JobAddressOpt, wait: float = typer.Option(30, "--wait", help="Seconds to wait for the job to end (0: return at once)")):
    """Stop a running job."""

    def go():
        from lossaverse.cluster import submit as jobs  # deferred: keeps `lossaverse --help` light

        jc = jobs.client(address)
        if not jobs.stop(jc, job_id):
            console.print(f"job {job_id} had already ended: {jobs.info(jc, job_id).status.value}")
            return
        status = jobs.wait(jc, job_id, wait).status.value if wait > 0 else "stop requested"
        console.print(f"job {job_id}: {status}")

    _guard(go)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/local")):
    """Re-render RUN_DIR/report.md and its plots (RUN_DIR/report/*.png) from the stored Parquet and JSON alone."""

    def go():
        from lossaverse.pipeline.report.report import render_report  # deferred: imports pandas

        out = render_report(run_dir)
        console.print(summary_table(run_dir))
        console.print(f"report: {out['report']}")
        for path in out["plots"]:
            console.print(f"plot: {path}")

    _guard(go)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory, e.g. runs/local"),
    out_dir: Path = typer.Argument(..., help="Where the datasets folder goes (must be empty or absent)"),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR even if it is not empty"),
):
    """Release RUN_DIR's kto / pairs / negatives as a Hugging Face datasets folder with a dataset card."""

    def go():
        from lossaverse.pipeline.report.export import export_run  # deferred: keeps `lossaverse --help` light

        counts = export_run(run_dir, out_dir, force)
        console.print(", ".join(f"{name}: {rows} rows" for name, rows in counts.items()))
        console.print(f"datasets folder: {out_dir.resolve()}  (datasets.load_dataset(\"{out_dir}\", \"kto\"))", markup=False)

    _guard(go)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
