"""The `lossaverse` command line: each command loads a config, runs stages, reports."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Turn a benchmark into an aligned model.")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOpt = typer.Option([], "--set", help="Override a config value: --set generate.sampling.samples=4")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
ForceOpt = typer.Option(False, "--force", help="Re-run stages even if their outputs are complete")


def _execute(config: Path, overrides: list[str], stages: list[str], force: bool, address: Optional[str]):
    from cluster.config import load_config
    from cluster.ray_env import init_ray, shutdown_ray
    from cluster.stages import execute

    cfg = load_config(config, overrides)  # fails before any work starts
    start = time.perf_counter()
    console.print(init_ray(cfg.ray, address))
    try:
        execute(cfg, stages, force=force, report=console.print)
    finally:
        shutdown_ray()
    return cfg, time.perf_counter() - start


def _guard(fn):
    """Turn the errors a user can fix into one line on stderr and exit code 2."""
    from cluster.config import ConfigError
    from cluster.stages import StageError
    from pipeline.benchmarks import BenchmarkError
    from pipeline.schemas import SchemaError

    try:
        return fn()
    except (ConfigError, StageError, BenchmarkError, SchemaError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def summary_table(run_dir: Path) -> Table:
    """The headline numbers of a run, read back from its run directory."""
    table = Table(title=f"lossaverse run: {run_dir}")
    table.add_column("what")
    table.add_column("value", justify="right")
    stats_path = run_dir / "datasets" / "stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        for name, c in stats["competitors"].items():
            table.add_row(f"competitor {name} accuracy", f"{c['accuracy']:.3f} ({c['correct']}/{c['answers']})")
        labels = stats["labels"]
        table.add_row("datasets/kto rows (desirable / undesirable)", f"{labels['total']} ({labels['desirable']} / {labels['undesirable']})")
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    ds = manifest.get("stages", {}).get("datasets", {})
    for name in ("negatives", "pairs"):
        if name in ds:
            table.add_row(f"datasets/{name} rows", str(ds[name]))
    results_path = run_dir / "eval" / "results.json"
    if results_path.is_file():
        for name, r in json.loads(results_path.read_text()).items():
            label = {"target-base": "target before training", "target-kto": "target after KTO"}.get(name, name)
            table.add_row(f"{label} accuracy (eval)", f"{r['accuracy']:.3f} ({r['correct']}/{r['answers']})")
    return table


def _command(config: Path, overrides: list[str], stages: list[str], force: bool, address: Optional[str]) -> None:
    def go():
        cfg, seconds = _execute(config, overrides, stages, force, address)
        console.print(summary_table(cfg.run_dir))
        console.print(f"run directory: {cfg.run_dir.resolve()}  ({seconds:.0f}s)")

    _guard(go)


@app.command()
def run(config: Path, set: list[str] = SetOpt, force: bool = ForceOpt, address: Optional[str] = AddressOpt):
    """Every stage: items, generate, mark, datasets, train, evaluate."""
    from cluster.stages import STAGE_NAMES

    _command(config, set, STAGE_NAMES, force, address)


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
        from cluster.config import MarkConfig, RayConfig
        from cluster.ray_env import init_ray, shutdown_ray
        from cluster.stages import build_dataset_dir, mark_answers

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
def train(config: Path, set: list[str] = SetOpt, force: bool = ForceOpt, address: Optional[str] = AddressOpt):
    """Align the target with KTO on datasets/kto (Ray Train + DeepSpeed + TRL)."""
    _command(config, set, ["train"], force, address)


@app.command()
def evaluate(config: Path, set: list[str] = SetOpt, force: bool = ForceOpt, address: Optional[str] = AddressOpt):
    """The target, before and after training, on the eval split through the same generate and mark."""
    _command(config, set, ["evaluate"], force, address)


@app.command()
def check(config: Path, set: list[str] = SetOpt):
    """Validate a config without running anything."""

    def go():
        from cluster.config import load_config

        cfg = load_config(config, set)
        console.print(f"ok: {config} (run directory {cfg.run_dir})")

    _guard(go)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
