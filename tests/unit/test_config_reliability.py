"""Config checks that refuse, before any GPU time, settings that would silently train nothing."""

import pytest
from pydantic import ValidationError

from lossaverse.cluster.config import EngineConfig, ServeConfig, TrainConfig


def test_gpu_training_without_deepspeed_is_refused_as_bf16_without_master_weights():
    """bf16 weights updated by AdamW directly: at lr 5e-7 an update of a weight near 1 is below
    bf16's spacing there (2^-7 = 0.0078), so it rounds away. DeepSpeed keeps fp32 master weights."""
    with pytest.raises(ValidationError, match="deepspeed: none with train.use_gpu .* no fp32 master copy"):
        TrainConfig(use_gpu=True, deepspeed="none")
    TrainConfig(use_gpu=True, deepspeed="zero2")
    TrainConfig(use_gpu=False, deepspeed="none")  # CPU trains in fp32


def test_engine_restarts_are_bounded_by_default_and_serve_caps_have_defaults():
    assert EngineConfig().max_restarts == 3
    with pytest.raises(ValidationError, match="max_restarts"):
        EngineConfig(max_restarts=-1)  # Ray's "forever"
    s = ServeConfig()
    assert (s.max_n, s.max_prompts, s.max_logprobs, s.api_key_env) == (4, 16, 5, None)
    with pytest.raises(ValidationError, match="api_key_env"):
        ServeConfig(api_key_env="not a variable name")
