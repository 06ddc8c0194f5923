"""The run directory: Parquet in, Parquet out, written atomically, with a manifest written last.

A stage writes its output to `<dir>.tmp-<pid>` and renames it into place, then records itself in
`manifest.json`. The manifest entry is written last, so its presence (with a matching fingerprint)
means the stage's outputs are complete; a crash leaves at most a `.tmp-*` folder that is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"


def write_table(table: pa.Table, directory: Path, name: str = "part-0.parquet") -> Path:
    """Replace `directory` with one holding `table` as a single Parquet file."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(table, tmp / name)
    replace_dir(tmp, directory)
    return directory


def replace_dir(tmp: Path, directory: Path) -> None:
    """Move a finished `tmp` folder to `directory`, replacing what was there."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)


def read_table(directory: Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read every Parquet file under `directory` (sorted by name) as one table."""
    directory = Path(directory)
    files = sorted(directory.glob("*.parquet"))
    if not files:
        if schema is not None:
            return schema.empty_table()
        raise FileNotFoundError(f"no Parquet files under {directory}")
    tables = [pq.read_table(f, schema=schema) for f in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def write_json(data: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Manifest:
    """`manifest.json`: the resolved config, versions, and one entry per finished stage."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / MANIFEST
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("stages", {})

    def done(self, stage: str, fp: str) -> bool:
        entry = self.data["stages"].get(stage)
        return bool(entry) and entry.get("fingerprint") == fp

    def stage(self, stage: str) -> dict[str, Any]:
        return self.data["stages"].get(stage, {})

    def invalidate(self, stage: str) -> None:
        if self.data["stages"].pop(stage, None) is not None:
            self.save()

    def record(self, stage: str, fp: str, seconds: float, **info: Any) -> None:
        self.data["stages"][stage] = {
            "fingerprint": fp,
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **info,
        }
        self.save()

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.save()

    def save(self) -> None:
        write_json(self.data, self.path)
