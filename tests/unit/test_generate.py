import pyarrow as pa

from lossaverse.cluster.config import BenchmarkConfig, SamplingConfig
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.generation.generate import (
    PromptStyle,
    answers_from_outputs,
    build_prompt,
    chat_messages,
    expand_requests,
    finish_reason,
    http_output,
    http_payload,
)
from lossaverse.pipeline.models.tinymodels import build_tokenizer
from lossaverse.pipeline.sources.benchmarks import load_items


def _items(n=3):
    items, _ = load_items(BenchmarkConfig(n_train=n, n_eval=1), seed=0)
    return items.slice(0, n)


def test_one_request_per_item_and_sample_with_distinct_seeds():
    reqs = expand_requests(_items(), "small", "m", SamplingConfig(samples=4, temperature=0.7), seed=0)
    assert len(reqs) == 12
    assert sorted({r["sample"] for r in reqs}) == [0, 1, 2, 3]
    assert len({r["sampling_params"]["seed"] for r in reqs}) == 12
    again = expand_requests(_items(), "small", "m", SamplingConfig(samples=4, temperature=0.7), seed=0)
    assert [r["sampling_params"]["seed"] for r in reqs] == [r["sampling_params"]["seed"] for r in again]
    assert reqs[0]["prompt"].startswith("Question: ") and reqs[0]["prompt"].endswith("Answer:")


def test_chat_models_get_their_chat_template():
    tok = build_tokenizer(["hello world 123"])
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    reqs = expand_requests(_items(1), "large", "m", SamplingConfig(), seed=0, tokenizer=tok)
    assert reqs[0]["prompt"].startswith("<|user|>Question: ") and reqs[0]["prompt"].endswith("<|assistant|>")


def test_failed_rows_become_error_answers():
    reqs = expand_requests(_items(2), "small", "m", SamplingConfig(max_tokens=8), seed=0)
    outputs = [
        {**reqs[0], "generated_text": " The answer is 3.", "num_generated_tokens": 8},
        {**reqs[1], "__inference_error__": "ValueError: prompt too long"},
    ]
    table = answers_from_outputs(outputs)
    assert table.schema == ANSWERS and table.num_rows == 2
    rows = table.to_pylist()
    assert rows[0]["finish_reason"] == "length" and rows[0]["error"] is None
    assert rows[1]["finish_reason"] == "context_length" and rows[1]["completion"] == "" and "too long" in rows[1]["error"]
    assert finish_reason({"num_generated_tokens": 3, "max_tokens": 8}) == "stop"
    assert finish_reason({}, "RuntimeError: engine exploded") == "error"


def test_system_prompt_and_few_shot_turns_precede_the_question():
    style = PromptStyle(system_prompt="Be exact.", few_shot=(("What is 1 + 1?", "The answer is 2."),))
    item = _items(1).to_pylist()[0]
    messages = chat_messages(item, style)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Question: What is 1 + 1?\nAnswer:" and messages[2]["content"] == "The answer is 2."
    raw = build_prompt(item, style)  # a base model gets the examples as text, no system turn
    assert raw.startswith("Question: What is 1 + 1?\nAnswer: The answer is 2.\n\nQuestion: ") and "Be exact" not in raw


def test_chat_endpoint_requests_carry_messages_and_responses_map_to_answers():
    reqs = expand_requests(_items(1), "large", "served", SamplingConfig(max_tokens=8, stop=["\n"]), seed=0, api="chat")
    body = http_payload(reqs[0])["payload"]
    assert body["model"] == "served" and body["messages"][-1]["role"] == "user" and "prompt" not in body
    assert body["max_tokens"] == 8 and body["stop"] == ["\n"] and isinstance(body["seed"], int)
    ok = http_output({**reqs[0], "http_response": {"choices": [{"message": {"content": "The answer is 4."}, "finish_reason": "stop"}],
                                                   "usage": {"completion_tokens": 5}}})
    bad = http_output({**reqs[0], "http_response": {"error": {"message": "prompt is too long for the context"}}})
    rows = answers_from_outputs([ok, bad]).to_pylist()
    assert rows[0]["completion"] == "The answer is 4." and rows[0]["completion_tokens"] == 5 and rows[0]["error"] is None
    assert rows[1]["error"].startswith("endpoint error: prompt is too long") and rows[1]["finish_reason"] == "context_length"


def test_raw_few_shot_prompts_stop_where_the_next_example_would_begin():
    style = PromptStyle(few_shot=(("What is 1 + 1?", "The answer is 2."),))
    sampling = SamplingConfig(stop=["###"])
    raw = expand_requests(_items(1), "small", "m", sampling, seed=0, style=style)
    assert raw[0]["sampling_params"]["stop"] == ["###", "\n\nQuestion:"]
    zero_shot = expand_requests(_items(1), "small", "m", SamplingConfig(), seed=0)
    assert "stop" not in zero_shot[0]["sampling_params"]
    tok = build_tokenizer(["hello world 123"])
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    chat = expand_requests(_items(1), "large", "m", SamplingConfig(), seed=0, tokenizer=tok, style=style)
    assert "stop" not in chat[0]["sampling_params"]  # a chat turn ends with the template's own end token
    assert chat[0]["prompt"].startswith("<|user|>Question: What is 1 + 1?\nAnswer:<|assistant|>The answer is 2.<|user|>")


def _engine(num_gpus: float = 0):
    from lossaverse.pipeline.config import EngineConfig

    return EngineConfig(num_gpus=num_gpus)


def _wave_names(competitors, at_once, nodes):
    from lossaverse.pipeline.generation.generate import engine_waves

    return [[c.name for c in wave] for wave in engine_waves(competitors, at_once, nodes)]


def test_cpu_engines_on_one_machine_run_one_model_at_a_time_and_endpoints_join_the_first_wave():
    from lossaverse.pipeline.config import EndpointConfig
    from lossaverse.pipeline.generation.generate import Competitor

    cpu = [Competitor(n, "m", engine=_engine()) for n in ("base", "sft", "kto")]
    api = Competitor("api", "served", endpoint=EndpointConfig(url="http://127.0.0.1:1/v1"))
    assert _wave_names(cpu, None, nodes=1) == [["base"], ["sft"], ["kto"]]
    assert _wave_names([*cpu, api], None, nodes=1) == [["api", "base"], ["sft"], ["kto"]]
    assert _wave_names(cpu, 2, nodes=1) == [["base", "sft"], ["kto"]]  # set explicitly: honoured


def test_gpu_engines_or_several_nodes_run_every_model_at_once():
    from lossaverse.pipeline.generation.generate import Competitor

    cpu = [Competitor(n, "m", engine=_engine()) for n in ("large", "small")]
    gpu = [Competitor(n, "m", engine=_engine(1)) for n in ("large", "small")]
    assert _wave_names(cpu, None, nodes=3) == [["large", "small"]]
    assert _wave_names(gpu, None, nodes=1) == [["large", "small"]]
    assert _wave_names(gpu, 1, nodes=1) == [["large"], ["small"]]
