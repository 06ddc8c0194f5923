"""Start the model app (and the marker) on the connected Ray's Serve, and stop them; `lossaverse
serve` (lossaverse.cluster.serve) starts Ray, calls these and keeps the apps up until Ctrl-C or SIGTERM.

Two Serve applications share one HTTP proxy: `lossaverse` (the OpenAI-compatible model API, route
`/`, so `/v1/...`) and `marker` (route `/mark`). A RayService runs the same two through
`lossaverse.cluster.serve:build_app` and `lossaverse.serving.marker:build_app`.
"""

from __future__ import annotations

from lossaverse.serving.model import ServeError, ServePlan, model_app

MODEL_APP, MARKER_APP = "lossaverse", "marker"


def start(plan: ServePlan) -> list[str]:
    """Deploy the apps on the connected Ray (waits until their replicas are up); return the URLs."""
    from ray import serve  # deferred: Ray loads in seconds

    from lossaverse.serving.marker import marker_app  # deferred: imports FastAPI, pandas, Ray

    s = plan.serve
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    apps = [serve.RunTarget(model_app(plan), name=MODEL_APP, route_prefix="/")]
    if s.marker:
        marker = marker_app(s.max_body_bytes, s.max_mark_answers, s.ingress_num_cpus, api_key_env=s.api_key_env)
        apps.append(serve.RunTarget(marker, name=MARKER_APP, route_prefix="/mark"))
    try:
        serve.run_many(apps)  # deployed side by side; returns once every app is RUNNING
    except RuntimeError as exc:  # a deployment that failed to start: Serve says which and why
        raise ServeError(f"the serving app did not start: {exc}") from None
    base = f"http://{s.host}:{s.port}"
    lines = [f"OpenAI-compatible API: {base}/v1  (models: {', '.join(plan.models)})"]
    if s.marker:
        lines.append(f"marker: POST {base}/mark")
    return lines


def stop() -> None:
    """Shut Serve and its apps down (Ray itself is the caller's to stop)."""
    from ray import serve  # deferred: Ray loads in seconds

    serve.shutdown()
