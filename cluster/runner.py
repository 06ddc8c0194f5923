"""Runs a config's stages in order (lossaverse.cluster.stages.STAGES), skipping each one whose
manifest entry has the same fingerprint; `force` runs it and everything after it again."""

from __future__ import annotations

import time
from typing import Callable

from lossaverse.cluster.config import RunConfig
from lossaverse.cluster.evaluate import run_evaluate
from lossaverse.cluster.stages import (REPORT, STAGE_NAMES, STAGES, run_datasets, run_generate, run_items, run_mark,
                                       run_train, stage_fingerprints, versions)
from lossaverse.pipeline.data.rundir import Manifest

RUNS = {"items": run_items, "generate": run_generate, "mark": run_mark, "datasets": run_datasets, "train": run_train,
        "evaluate": run_evaluate}


def execute(cfg: RunConfig, names: list[str], force: bool = False, report: Callable[[str], None] = print) -> Manifest:
    """Run the named stages in pipeline order; skip those already complete unless `force`."""
    unknown = set(names) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; valid: {STAGE_NAMES}")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    manifest.update(config=cfg.model_dump(mode="json"), versions=versions())
    fps = stage_fingerprints(cfg)
    REPORT.set(report)
    for stage in STAGES:
        if stage.name not in names:
            continue
        if manifest.done(stage.name, fps[stage.name]) and not force:
            report(f"[dim]skip[/] {stage.name}: complete ({manifest.stage(stage.name).get('seconds')}s earlier run)")
            continue
        # Invalidate before running, so a crash never leaves a stale entry beside fresh outputs.
        for later in STAGE_NAMES[STAGE_NAMES.index(stage.name):]:
            manifest.invalidate(later)
        report(f"[bold]run[/] {stage.name} ...")
        start = time.perf_counter()
        info = RUNS[stage.name](cfg, run_dir)
        manifest.record(stage.name, fps[stage.name], time.perf_counter() - start, **info)
        report(f"[green]done[/] {stage.name} in {time.perf_counter() - start:.1f}s: {_short(info)}")
    return manifest


def _short(info: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (dict, list)))
