"""Generation: items -> answers through vLLM engines or OpenAI-compatible endpoints, sharded and resumable.
In: the `items` contract, competitors and engine settings (KV-cache sizing included).
Out: the `answers` contract, and the Ray Data LLM processors the judge reuses. May import data only."""
