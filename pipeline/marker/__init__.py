"""The exam marker: right or wrong against the reference, by rules, math-verify or an optional supervisory LLM.
In: the `answers` contract (or single rows). Out: the `marked` contract and the marker's version.
May import data, generation (the judge's engine) and models (the judge's model reference)."""
