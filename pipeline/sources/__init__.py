"""Benchmark loaders: the built-in set, JSONL, Parquet and Hugging Face datasets, by source name (LOADERS).
In: a benchmark config (source, paths, splits, counts). Out: the `items` contract and quarantined rows.
May import data, and marker (a numeric reference is stored in the form the marker reads)."""
