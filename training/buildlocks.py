"""Stale build locks of torch C++ extensions, cleared before training.

On CPU, `deepspeed.initialize` loads DeepSpeed's shared-memory communication op through
`torch.utils.cpp_extension.load`, which takes `<build directory>/lock` (torch's `FileBaton`) and,
when the file already exists, waits for it to go away, without a timeout. A worker killed while it
held the lock (by Ray's memory monitor, Ctrl-C, a lost node) leaves the file behind, and every later
training on that machine then hangs in `deepspeed.initialize`. torch has no option for a timeout or
for a lock owned by a dead process, so the driver removes locks older than any build of these ops
takes (they build in well under a minute) before it starts the workers. Only the driver's machine
is cleared; a worker on another node is not reachable from here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STALE_S = 600.0  # seconds: older locks belong to no running build


def extensions_root() -> Path:
    """torch's extension build root: $TORCH_EXTENSIONS_DIR, else its per-user default."""
    from torch.utils.cpp_extension import get_default_build_root  # deferred: torch loads in seconds

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_locks(root: Path | None = None, stale_s: float = STALE_S, now: float | None = None) -> list[Path]:
    """Remove build locks under `root` older than `stale_s`; return the removed paths."""
    root = extensions_root() if root is None else root
    now = time.time() if now is None else now
    removed = []
    # <root>/<extension>/lock with $TORCH_EXTENSIONS_DIR; <root>/<py311_cpu>/<extension>/lock without.
    for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
        try:
            if now - lock.stat().st_mtime > stale_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # its build finished meanwhile
            continue
    return removed
