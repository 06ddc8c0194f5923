"""The run directory: Parquet in, Parquet out, written atomically, with a manifest written last.

A stage writes its output to `<dir>.tmp-<pid>` and renames it into place, then records itself in
`manifest.json`. The manifest entry is written last, so its presence (with a matching fingerprint)
means the stage's outputs are complete; a crash leaves at most a `.tmp-*` folder that is ignored.

Every helper takes a local path or a URI that pyarrow's filesystems know (`file:///shared/runs`,
`s3://bucket/runs`, `gs://bucket/runs`, `hdfs://namenode:8020/runs`, and `mock:///` pyarrow's
in-memory filesystem), so stages on different nodes can share one run directory. On local and
HDFS paths the final rename is atomic; object stores have no directory rename, so there the
folder is copied into place and the tmp folder deleted — safe all the same, because a stage counts
as done only once its manifest entry is written, after its outputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

MANIFEST = "manifest.json"
LOCK, HOLDER = ".driver.lock", ".driver.json"  # the run directory's lock, and who holds it

# `Path("s3://bucket/x")` prints as `s3:/bucket/x`; such a collapsed URI is restored, so that code
# that joins run-directory paths with `/` can pass URIs through. (Two or more letters: not `C:/`.)
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
_NO_HOST = ("file", "mock")  # schemes whose URIs have an empty host: file:///path, mock:///path


def _uri(where: str | os.PathLike) -> str:
    text = os.fspath(where)
    m = _COLLAPSED.match(text)
    if m:
        slashes = ":///" if m.group(1).lower() in _NO_HOST else "://"
        text = m.group(1) + slashes + text[m.end():]
    return text


@functools.lru_cache(maxsize=None)
def _root(scheme_host: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per `scheme://host` (credentials and region resolved once), and the path
    prefix its paths start with (`bucket` on object stores, `/` on HDFS, `` on mock)."""
    fs, prefix = pafs.FileSystem.from_uri(scheme_host + "/")
    return fs, prefix.rstrip("/")


_LOCAL = pafs.LocalFileSystem()


def resolve(where: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI -> (pyarrow filesystem, path on it)."""
    text = _uri(where)
    if "://" not in text:
        return _LOCAL, os.path.abspath(os.path.expanduser(text))
    scheme, rest = text.split("://", 1)
    host, _, sub = rest.partition("/")
    if scheme.lower() == "file":  # file:///abs/path, or file://localhost/abs/path
        return _LOCAL, os.path.abspath(rest if rest.startswith("/") else "/" + sub)
    fs, prefix = _root(f"{scheme}://{host}")
    return fs, "/".join(p for p in (prefix, sub.strip("/")) if p) or "/"


def _is_uri(where) -> bool:
    return "://" in _uri(where)


def _sibling(where, name: str):
    """`where`'s sibling called `name`, of the same kind (Path for paths, str for URIs)."""
    if _is_uri(where):
        return _uri(where).rstrip("/").rsplit("/", 1)[0] + "/" + name
    return Path(where).with_name(name)


def _join(where, name: str):
    if _is_uri(where):
        return _uri(where).rstrip("/") + "/" + name
    return Path(where) / name


def _basename(where) -> str:
    return _uri(where).rstrip("/").rsplit("/", 1)[-1]


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def write_table(table: pa.Table, directory: Path | str, name: str = "part-0.parquet") -> Path | str:
    """Replace `directory` with one holding `table` as a single Parquet file."""
    tmp = _sibling(directory, f"{_basename(directory)}.tmp-{os.getpid()}")
    fs, tmp_path = resolve(tmp)
    _delete_dir(fs, tmp_path)
    fs.create_dir(tmp_path, recursive=True)
    pq.write_table(table, f"{tmp_path}/{name}", filesystem=fs)
    replace_dir(tmp, directory)
    return directory


def _move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    try:
        fs.move(src, dst)
    except (OSError, NotImplementedError):  # object stores: no directory rename
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)


def replace_dir(tmp: Path | str, directory: Path | str) -> None:
    """Move a finished `tmp` folder to `directory`, replacing what was there."""
    fs, src = resolve(tmp)
    dst_fs, dst = resolve(directory)
    if fs is not dst_fs:
        raise ValueError(f"{tmp} and {directory} are on different filesystems")
    parent = dst.rstrip("/").rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if _exists(fs, dst):
        old = f"{dst}.old-{os.getpid()}"
        _delete_dir(fs, old)
        _move_dir(fs, dst, old)
        _move_dir(fs, src, dst)
        _delete_dir(fs, old)
    else:
        _move_dir(fs, src, dst)


def read_table(directory: Path | str, schema: pa.Schema | None = None) -> pa.Table:
    """Read every Parquet file directly under `directory` (sorted by name) as one table."""
    fs, path = resolve(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        if schema is not None:
            return schema.empty_table()
        raise FileNotFoundError(f"no Parquet files under {directory}")
    tables = [pq.read_table(f, schema=schema, filesystem=fs) for f in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def write_json(data: Any, path: Path | str) -> None:
    fs, target = resolve(path)
    parent = target.rstrip("/").rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as out:
        out.write((json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())
    fs.move(tmp, target)  # a file move: a rename locally, copy + delete on object stores


def read_json(path: Path | str, default: Any = None) -> Any:
    """The JSON document at `path`, or `default` when there is none."""
    fs, target = resolve(path)
    if fs.get_file_info(target).type != pafs.FileType.File:
        return default
    with fs.open_input_stream(target) as f:
        return json.loads(f.read())


def cache_root() -> Path:
    """The local cache of built and fetched models (tiny models, packaged models' wheels and
    conversions): $LOSSAVERSE_CACHE, else ~/.cache/lossaverse."""
    return Path(os.environ.get("LOSSAVERSE_CACHE", Path.home() / ".cache" / "lossaverse")).expanduser()


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunDirLocked(RuntimeError):
    """Another driver holds the run directory; the message names it."""


_HELD: dict[str, Any] = {}  # run directory -> this process's lock on it


def lock_run_dir(run_dir: Path | str) -> None:
    """Hold the run directory for this process, or raise RunDirLocked naming the driver holding it.

    Two drivers on one run directory would overwrite each other's manifest (a whole-file
    read-modify-write) and outputs. The lock is an OS file lock (`filelock`) on
    `<run_dir>/.driver.lock`, so it is released whenever the process ends, also when killed; the
    holder (host, pid, command, start) is written beside it only for the message. Taken once per
    process and kept until it exits (a driver runs stage after stage on its directory). Local
    paths only: object stores have no file locks, and there the run directory is not locked."""
    if _is_uri(run_dir):
        return
    where = os.path.abspath(os.path.expanduser(os.fspath(run_dir)))
    if where in _HELD:
        return

    os.makedirs(where, exist_ok=True)
    lock = FileLock(os.path.join(where, LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = read_json(os.path.join(where, HOLDER), {}) or {}
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
               f"(`{holder.get('command', '?')}`, since {holder.get('since', '?')})")
        raise RunDirLocked(f"run directory {where} is in use by another driver: {who}; "
                           "wait for it to finish or stop it, or give this run another name") from None
    _HELD[where] = lock
    write_json({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, os.path.join(where, HOLDER))


class Manifest:
    """`manifest.json`: the resolved config, versions, and one entry per finished stage. Opening
    it takes the run directory's driver lock (`lock_run_dir`)."""

    def __init__(self, run_dir: Path | str):
        lock_run_dir(run_dir)
        self.path = _join(run_dir, MANIFEST)
        self.data: dict[str, Any] = read_json(self.path, {})
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
