"""Release a run's training data as a Hugging Face datasets folder.

`export_run(run_dir, out_dir)` reads `datasets/{kto,pairs,negatives}`, `datasets/stats.json` and
`manifest.json` of a finished run and writes

```
OUT_DIR/
  README.md                                 dataset card: YAML metadata (licence, task categories,
                                            size category, one config per dataset) and provenance
  kto/train-00000-of-00001.parquet          the run's datasets/kto rows, unchanged
  pairs/train-00000-of-00001.parquet        the run's datasets/pairs rows
  negatives/train-00000-of-00001.parquet    the run's datasets/negatives rows
```

so that `datasets.load_dataset(OUT_DIR, "kto")` (or "pairs", "negatives") loads one of them; each
has one split, `train`, since every row answers an item of the benchmark's train split. A multi-round
run is exported from its last round, whose datasets hold the rows of every round (column `round`).

The folder is written next to OUT_DIR under a temporary name and renamed into place, so OUT_DIR
either holds a complete export or is left as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lossaverse.pipeline.data.rundir import MANIFEST, read_json, read_table, replace_dir
from lossaverse.pipeline.report.datacard import render_card

DATASETS = ("kto", "pairs", "negatives")
SPLIT = "train"
FILE = f"{SPLIT}-00000-of-00001.parquet"  # the Hub's shard naming, so the card's glob finds it


class ExportError(ValueError):
    """A run directory that cannot be exported, or an OUT_DIR that may not be written."""


def last_round_dir(run_dir: Path) -> Path:
    """The directory of the run's last round: rounds/<k>/ for a multi-round run, else run_dir."""
    rounds = read_json(run_dir / "rounds.json") or []
    last = max((r["round"] for r in rounds), default=1)
    return run_dir if last == 1 else run_dir / "rounds" / str(last)


def read_run(run_dir: Path | str) -> dict:
    """{"run_dir", "manifest", "stats", "tables": {name: table}} of a finished run; ExportError
    naming every missing piece when the run directory is missing or its datasets are incomplete."""
    top = Path(run_dir)
    if not top.is_dir():
        raise ExportError(f"run directory {top} does not exist: give the folder `lossaverse run CONFIG` wrote (runs/<name>)")
    where = last_round_dir(top)
    manifest = read_json(where / MANIFEST)
    missing = [] if manifest is not None else [MANIFEST]
    if manifest is not None and "datasets" not in manifest.get("stages", {}):
        missing.append(f"{MANIFEST} entry for the datasets stage (it is written last, once datasets/ is complete)")
    missing += [f"datasets/{name}/" for name in DATASETS if not any((where / "datasets" / name).glob("*.parquet"))]
    if not (where / "datasets" / "stats.json").is_file():
        missing.append("datasets/stats.json")
    if missing:
        raise ExportError(f"run directory {where} is incomplete: missing {', '.join(missing)}; "
                          "run `lossaverse run CONFIG` (or `lossaverse mark CONFIG`) to finish it")
    tables = {name: read_table(where / "datasets" / name) for name in DATASETS}
    recorded = manifest["stages"]["datasets"]
    for name, table in tables.items():
        if name in recorded and recorded[name] != table.num_rows:
            raise ExportError(f"{where}/datasets/{name} holds {table.num_rows} rows but {MANIFEST} recorded "
                              f"{recorded[name]}: re-run `lossaverse mark CONFIG --force` to rebuild the datasets")
    return {"run_dir": where, "manifest": manifest, "stats": read_json(where / "datasets" / "stats.json"), "tables": tables}


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    out, run_dir = out.resolve(), run_dir.resolve()
    if out == run_dir or out in run_dir.parents:
        raise ExportError(f"OUT_DIR {out} holds the run directory {run_dir}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT_DIR {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"OUT_DIR {out} is not empty; pass --force to replace it")


def write_export(tables: dict[str, pa.Table], card: str, out_dir: Path) -> None:
    """Write the Parquet files and README.md to a temporary folder beside out_dir, then rename it
    into place (replacing what was there)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, table in tables.items():
            (tmp / name).mkdir(parents=True)
            pq.write_table(table, tmp / name / FILE)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_run(run_dir: Path | str, out_dir: Path | str, force: bool = False) -> dict[str, int]:
    """RUN_DIR's kto / pairs / negatives -> a datasets folder at OUT_DIR; returns the rows per dataset.
    Refuses a non-empty OUT_DIR unless `force`."""
    out = Path(out_dir)
    run = read_run(run_dir)
    _check_out(out, Path(run_dir), force)
    card = render_card(run["manifest"], run["stats"], run["tables"], {name: f"{name}/{SPLIT}-*.parquet" for name in DATASETS}, SPLIT)
    write_export(run["tables"], card, out)
    return {name: table.num_rows for name, table in run["tables"].items()}
