"""The bench command's arithmetic: spread of repeats, the cost model, the scaling plot."""

import matplotlib.image as mpimg

from cluster.bench import cost_model, plot_scaling, spread
from cluster.config import load_config
from tests.conftest import ROOT


def _generate_result(per_replica=1000.0):
    point = lambda v: {"median": v, "min": v, "max": v, "n": 1}  # noqa: E731
    return {
        "generate": {
            "tokens_per_answer": 20.0,
            "replicas": {1: {"steady_tokens_per_s": point(per_replica), "startup_s": point(30.0)},
                         2: {"steady_tokens_per_s": point(1.5 * per_replica), "startup_s": point(40.0)}},
        },
        "mark": {"rows": {100000: {"kinds": {"numeric": {"rows_per_s": point(200_000.0)}}}}},
    }


def test_spread_reports_median_and_range():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_cost_model_scales_the_measured_per_replica_rate():
    """10,000 prompts x 4 samples x 20 tokens = 800,000 tokens; at 1,000 tokens/s per replica on
    8 replicas that is 100 s, plus 30 s start-up = 130 s = 0.0361 h. Marking 40,000 rows at
    200,000 rows/s takes 0.2 s, so generation is the bottleneck."""
    cfg = load_config(ROOT / "configs" / "local.yaml")
    cost = cost_model(_generate_result(), cfg, prompts=10_000, samples=4, replicas=8)
    assert cost["generate_hours"] == round(130 / 3600, 3)
    assert cost["replica_hours"] == round(130 / 3600 * 8, 3)
    assert cost["gpu_hours"] is None  # CPU engines: no GPUs in the plan
    assert cost["bottleneck"] == "generate" and cost["mark_hours"] == round(40_000 / 200_000 / 3600, 5)
    gpu = load_config(ROOT / "configs" / "gsm8k.yaml")  # large: tensor parallel 2, one GPU per bundle
    assert cost_model(_generate_result(), gpu, 10_000, 4, 8)["inputs"]["gpus"] == 16


def test_scaling_plot_is_written(tmp_path):
    result = _generate_result()
    plot_scaling(result, tmp_path / "scaling.png")
    image = mpimg.imread(tmp_path / "scaling.png")
    assert image.shape[0] > 100 and image.shape[1] > 200
