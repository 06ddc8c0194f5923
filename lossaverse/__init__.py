"""The Python API, for notebooks and scripts that drive the loop (and Ray) themselves.

    import lossaverse as lv

    cfg = lv.load_config("configs/local.yaml", ["benchmark.n_eval=200"])  # validated, or ConfigError
    lv.run(cfg, stages=["items", "generate", "mark"])   # some stages; lv.run(cfg) runs them all
    verdicts = lv.mark([{"kind": "numeric", "reference": "42", "completion": "6 * 7 = 42. The answer is 42."}])
    res = lv.results("runs/local")                      # accuracies, CIs, paired differences, stages

The command line runs the same code: `lossaverse ...` or `python -m lossaverse ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import pyarrow as pa

    from lossaverse.cluster.config import RunConfig

__all__ = ["load_config", "run", "mark", "results", "STAGES"]

# The stages' packages install inside this one (pyproject's package-dir: lossaverse.pipeline, ...). In
# a source tree (a checkout on PYTHONPATH, or a Ray job's uploaded working_dir) they are the folders
# beside it at the top of the repository: search there too, so that the tree's own code is imported
# whether or not the project is installed. (A wheel has them inside: nothing is added.)
_top = Path(__file__).resolve().parent.parent
if not (Path(__path__[0]) / "pipeline").is_dir() and (_top / "pipeline" / "__init__.py").is_file():
    __path__.append(str(_top))

# Every stage of a run, in order (lossaverse.cluster.stages.STAGE_NAMES).
STAGES = ("items", "generate", "mark", "datasets", "train", "evaluate")


def load_config(config: str | Path, overrides: Iterable[str] = ()) -> "RunConfig":
    """Read a YAML run config, apply `KEY=VALUE` overrides (as `--set`), validate it.

    Raises `lossaverse.cluster.config.ConfigError` naming the bad field."""
    from lossaverse.cluster.config import load_config as _load  # deferred: keeps `lossaverse --help` light

    return _load(config, list(overrides))


def run(config: "str | Path | RunConfig", stages: Iterable[str] | None = None, *, overrides: Iterable[str] = (),
        force: bool = False, address: str | None = None, report: Callable[[str], None] = print) -> Path:
    """Run `stages` (default: all of `STAGES`, `rounds.count` times) and return the run directory.

    Finished stages whose config is unchanged are skipped, as with the command line. Ray: a Ray
    this process already started (`ray.init(...)`) is used and left running; otherwise `address`
    (or RAY_ADDRESS) is connected to, or an embedded local Ray is started, and shut down at the end.
    A run whose every stage is already complete starts no Ray.
    """
    from lossaverse.cluster.config import RunConfig  # deferred: keeps `lossaverse --help` light
    from lossaverse.cluster.rounds import run_stages  # deferred: imports pandas
    from lossaverse.cluster.stages import STAGE_NAMES  # deferred: imports pandas
    from lossaverse.pipeline.data.rundir import lock_run_dir  # deferred: keeps `lossaverse --help` light

    if isinstance(config, RunConfig):
        if overrides:
            raise TypeError("overrides apply to a config file; change a RunConfig with load_config(path, overrides)")
        cfg = config
    else:
        cfg = load_config(config, overrides)
    names = list(stages) if stages is not None else list(STAGE_NAMES)
    unknown = [s for s in names if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid: {list(STAGE_NAMES)}")
    lock_run_dir(cfg.run_dir)
    run_stages(cfg, names, force=force, report=report, address=address)
    return cfg.run_dir


# The columns `mark` reads; the others of the answers contract are filled in for the marker.
MARK_COLUMNS = ("kind", "reference", "completion", "choices", "finish_reason", "question", "id")


def mark(rows: "pa.Table | list[dict[str, Any]]", timeout_s: float = 5) -> "pa.Table":
    """Grade answers against their references with the exam marker (the mark stage's code).

    `rows`: a `pyarrow.Table` or a list of dicts with `kind` (numeric, math, choice, exact),
    `reference` and `completion`, and optionally `choices` (kind choice), `finish_reason`
    ("length": cut by the token limit), `question` and `id`. Each row is checked first
    (`lossaverse.serving.marker.Answer`, as `POST /mark` does): a bad row raises ValueError naming its index
    and field. Returns the input rows, in order, with `correct`, `extracted`, `reason` and
    `marked_by` added.
    """
    import pyarrow as pa  # deferred: keeps `lossaverse --help` light
    from pydantic import ValidationError  # deferred: keeps `lossaverse --help` light

    from lossaverse.pipeline.config import errors_in  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.data.schemas import ANSWERS  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.marker.mark import mark_table  # deferred: keeps `lossaverse --help` light
    from lossaverse.serving.marker import Answer  # deferred: imports FastAPI, pandas, Ray

    if isinstance(rows, pa.Table):
        table = rows
    else:  # the union of the rows' keys, in first-seen order (from_pylist reads the first row's only)
        rows = list(rows)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        table = pa.table({k: [r.get(k) for r in rows] for k in keys}) if rows else pa.table({})
    checked = []
    for i, row in enumerate(table.select([c for c in MARK_COLUMNS if c in table.column_names]).to_pylist()):
        try:
            checked.append(Answer(**{k: v for k, v in row.items() if v is not None}))  # null: not given
        except ValidationError as exc:
            raise ValueError(errors_in(f"mark: row {i}", exc)) from None
    n = len(checked)
    columns = {
        "id": [a.id if a.id is not None else str(i) for i, a in enumerate(checked)],
        "question": [a.question for a in checked], "reference": [a.reference for a in checked],
        "kind": [a.kind for a in checked], "choices": [a.choices for a in checked],
        "completion": [a.completion for a in checked], "finish_reason": [a.finish_reason for a in checked],
        "sample": [0] * n,
    }
    answers = pa.table({f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in ANSWERS})
    marked = mark_table(answers, timeout_s)
    for name in ("correct", "extracted", "reason", "marked_by"):
        table = table.append_column(name, marked[name])
    return table


def results(run_dir: str | Path) -> dict:
    """What a run directory holds, as one dict: `eval` (eval/results.json: per model accuracy,
    items, 95% CI; `pairs`: paired differences with CI and McNemar p), `transfer`, `rounds`,
    `tune` where they exist, and `stages` (manifest.json: each finished stage's figures).

    Raises FileNotFoundError when `run_dir` holds no finished stage."""
    from lossaverse.pipeline.data.rundir import read_json  # deferred: keeps `lossaverse --help` light

    top = Path(run_dir)
    manifest = read_json(top / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{top}: no manifest.json, so no finished stage; run `lossaverse run CONFIG` first")
    out = {"run_dir": str(top), "stages": manifest.get("stages", {})}
    for key, path in (("eval", "eval/results.json"), ("transfer", "eval/transfer/results.json"),
                      ("rounds", "rounds.json"), ("tune", "tune.json")):
        value = read_json(top / path)
        if value is not None:
            out[key] = value
    return out
