"""Writes the Parquet twins of the JSONL fixtures here (run from the repository root:
`python tests/data/make_parquet.py`); tests/unit/test_benchmarks.py checks they still agree.

- <name>.parquet: each dataset-format JSONL as Parquet (ARC's `choices` a struct, MMLU's `answer` int64).
- hf_gsm8k/: openai/gsm8k's hub layout (README configs, main/{train,test}-00000-of-00001.parquet),
  for the Hugging Face loader offline.
- gsm8k_answers.parquet: the hand-written model answers of gsm8k_answers.jsonl in the answers
  contract (their `expect_*` grading columns left out).
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
HF_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""


def jsonl(name: str) -> pa.Table:
    return pj.read_json(HERE / name)


def main() -> None:
    import sys

    sys.path.insert(0, str(HERE.parents[1]))
    from lossaverse.pipeline.data.schemas import ANSWERS

    for path in sorted(HERE.glob("*.jsonl")):
        if path.name == "gsm8k_answers.jsonl":
            table = jsonl(path.name)
            pq.write_table(table.select(ANSWERS.names).cast(ANSWERS), HERE / "gsm8k_answers.parquet")
        else:
            pq.write_table(jsonl(path.name), path.with_suffix(".parquet"))
    hf = HERE / "hf_gsm8k"
    (hf / "main").mkdir(parents=True, exist_ok=True)
    (hf / "README.md").write_text(HF_README)
    pq.write_table(jsonl("gsm8k_train.jsonl"), hf / "main" / "train-00000-of-00001.parquet")
    pq.write_table(jsonl("gsm8k_test.jsonl"), hf / "main" / "test-00000-of-00001.parquet")


if __name__ == "__main__":
    main()
