"""What `lossaverse serve` hands Ray Serve, without a server: the request timeout for Serve's HTTP
proxies, and the custom resources that pin the model replicas to nodes."""

import pytest
from ray.serve.config import HTTPOptions

from lossaverse.cluster.config import EngineConfig, ServeConfig
from lossaverse.serving import run
from lossaverse.serving.model import ServePlan, llm_config


def _started(monkeypatch, serve: ServeConfig) -> dict:
    from ray import serve as ray_serve

    seen = {}
    monkeypatch.setattr(ray_serve, "start", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray_serve, "run_many", lambda apps: seen.update(apps=[a.name for a in apps]))
    monkeypatch.setattr(run, "model_app", lambda plan: object())
    run.start(ServePlan(serve, EngineConfig(kv_cache_gib=0.25), {"target": "m"}, 16))
    return seen


def test_serve_gets_the_request_timeout_so_no_request_waits_forever(monkeypatch):
    seen = _started(monkeypatch, ServeConfig(port=8123, marker=False))
    assert seen["http_options"] == {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 300}
    assert HTTPOptions(**seen["http_options"]).request_timeout_s == 300  # a field Serve knows
    assert seen["apps"] == [run.MODEL_APP]
    assert _started(monkeypatch, ServeConfig(request_timeout_s=None))["http_options"]["request_timeout_s"] is None


def test_a_request_timeout_must_be_positive():
    with pytest.raises(ValueError, match="request_timeout_s"):
        ServeConfig(request_timeout_s=0)


def test_custom_resources_of_the_engine_pin_every_replica():
    engine = EngineConfig(num_cpus=2, resources={"serve_engine": 1}, kv_cache_gib=0.25)
    cfg = llm_config("target", "m", engine, ServeConfig(min_replicas=2, max_replicas=2))
    assert cfg.placement_group_config["bundle_per_worker"] == {"CPU": 2, "serve_engine": 1}
    assert cfg.deployment_config["autoscaling_config"]["min_replicas"] == 2
