"""The exam marker's version: which reading rules produced a verdict.

`marker_version()` is the project's release plus a hash of the modules that hold the rules
(lossaverse.pipeline.marker.mark, marktext, markmath, judge), so any change to a rule changes the version without
anyone having to remember to bump a number. math-verify's version is reported beside it, since the
`math` rows it decides depend on it too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

RULE_MODULES = ("mark.py", "marktext.py", "markchoice.py", "markmath.py", "judge.py")  # beside this module, in pipeline/marker/


def _release(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=None)
def marker_version() -> str:
    """`<lossaverse release>+rules.<12 hex of sha256 over the rule modules' source>`."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in RULE_MODULES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return f"{_release('lossaverse')}+rules.{digest.hexdigest()[:12]}"


def marker_info() -> dict:
    """{"version", "math_verify"}: what a dataset card or manifest records about the marker."""
    return {"version": marker_version(), "math_verify": _release("math-verify")}
