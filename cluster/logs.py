"""A quiet console: the libraries' own output goes to the run's logs folder, the product's lines stay.

Ray, Ray Data, vLLM, DeepSpeed and the C++ parts of Ray all write to this process's stderr (file
descriptor 2): log lines, Ray Data's operator tables (printed every few seconds when stdout is no
terminal), warnings. `library_logs` points descriptor 2 at `<run>/logs/driver.log` while a command
runs, so every one of them (and any process this one starts) writes there, whatever logging set-up
the library chose; the command's own console and its error console keep the terminal. Ray's driver
prints what the raylets report (such as "N PYTHON worker processes have been started") with
`print` to `sys.stdout`, so `sys.stdout` points at the same log while the command's console keeps
the stream it had. Ray's worker
processes log into Ray's session folder (`log_to_driver` is off on an embedded Ray); that folder's
`logs/` is copied into `<run>/logs/ray/` at the end. `-v` / `--verbose` leaves everything as it was.

Python's logging has no single switch for this: the libraries attach their own stream handlers at
import time (Ray's at `import ray`, Ray Data's when `ray.data` is first imported), and C++ and child
processes write to the descriptor directly, so the descriptor is what is redirected.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DRIVER_LOG = "driver.log"
_STATE: dict = {}


def log_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "logs"


def active_log() -> Path | None:
    """The driver log the libraries write to now, or None (verbose, or outside a command)."""
    return _STATE.get("path")


@contextmanager
def library_logs(run_dir: Path, verbose: bool = False, consoles: tuple = (), outs: tuple = ()) -> Iterator[Path | None]:
    """Send descriptor 2 and `sys.stdout` to <run_dir>/logs/driver.log for the duration (unless
    `verbose`); the rich `consoles` given (the command's error console) keep writing to the
    terminal's stderr, and the rich `outs` (the command's own console) to the stdout they had. Ray
    Data's progress tables are turned off unless verbose (the product prints its own progress lines)."""
    if verbose or "path" in _STATE:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
        yield None
        return
    folder = log_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DRIVER_LOG
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    stdout, stderr = sys.stdout, sys.stderr
    kept = [(c, c.file, stderr) for c in consoles] + [(c, c.file, stdout) for c in outs]
    for c in consoles:
        c.file = terminal
    for c in outs:
        c.file = stdout
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stdout = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    _STATE.update(path=path, terminal=terminal)
    _LAST["path"] = path
    try:
        yield path
    finally:
        sys.stderr.flush()
        sys.stdout.close()
        sys.stdout = stdout
        os.dup2(terminal.fileno(), 2)
        for c, file, std in kept:
            c.file = None if file is std else file  # None: the console follows sys.stdout/stderr again
        terminal.close()
        _STATE.clear()
        copy_ray_logs(folder / "ray")


_SESSIONS: list[str] = []
_LAST: dict = {}


def note_session(session_dir: str | None) -> None:
    """Remember the Ray session folder this process started (its logs are copied at the end)."""
    if session_dir:
        _SESSIONS.append(session_dir)


def last_log() -> Path | None:
    """The driver log of the last command that redirected (for the error message's pointer)."""
    return _LAST.get("path")


def copy_ray_logs(dst: Path) -> None:
    """Copy the logs of the Ray sessions this process started into `dst` (sockets and vanished
    files skipped: the session may still be shutting down)."""
    while _SESSIONS:
        src = Path(_SESSIONS.pop()) / "logs"
        if not src.is_dir():
            continue
        for path in src.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            target = dst / path.relative_to(src)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            except OSError:
                pass
