"""The marker's suites of real-format model outputs, shipped as package data (read through
importlib.resources): model_outputs.jsonl (formats real math and reasoning models produce) and
math_verify_cases.jsonl (math-verify's own regression cases); tests/data/marker/make_*.py write them."""
