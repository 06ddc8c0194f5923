"""Benchmarks of the pipeline itself: the generate stage against vLLM offline, the marker's speed, measuring helpers.
In: a model, row counts and repeats. Out: timings, memory peaks and throughput as JSON-ready dicts.
May import data, generation and marker."""
