"""Row contracts and data: schemas, prompt templates, the run directory, the built-in benchmark, statistics, datasets.
In: pyarrow tables and plain values (no Ray, no models). Out: schemas, prompts, atomic Parquet I/O, kto / negatives /
pairs datasets and stats.json. Imports no other pipeline subpackage."""
