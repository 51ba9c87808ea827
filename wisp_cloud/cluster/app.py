"""The Ray Serve application: `replicas` verifier replicas, each serving the whole HTTP API, from `ServeSettings`.

Every replica is the application's ingress (`serve.ingress` over `VerifierReplica`, whose app is
`server.create_app` over a `fleet.FleetService`), so Serve's HTTP proxy hands each request to one
replica, chosen by `router.SessionRouter`: by the `x-session-id` header for a session's rounds, by load
otherwise.

`build_app(settings)` binds the graph (the whole settings object goes to every replica); `serve(settings)`
is `wisp-cloud serve --replicas N` / `--ray-address ADDR`: join or start Ray, start Serve's HTTP proxy on
the configured host and port, deploy, and block until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import signal
import time

from wisp_cloud.cluster.replica import VerifierReplica
from wisp_cloud.cluster.placement import STATS_PERIOD_S
from wisp_cloud.settings import ServeSettings

APP_NAME = "wisp"
VERIFIER = "WispVerifier"
ROUTER = "wisp_cloud.cluster.router.SessionRouter"
MAX_ONGOING = 100_000  # admission control is the verifier's own (429/503 with Retry-After), not Serve's queue cap
DRAIN_S = 60.0  # a replica scaled down finishes the rounds it holds for up to this long


def uses_gpu(settings: ServeSettings) -> bool:
    if settings.device == "auto":
        import torch

        return torch.cuda.is_available()
    return settings.device == "cuda"


def serve_logging(settings: ServeSettings) -> dict:
    """Serve's own logs at the server's level; one access-log line per request only at debug, as the
    single-process server does (Serve writes and flushes each line, several ms of CPU per round)."""
    return {"log_level": settings.log_level.upper(), "enable_access_log": settings.log_level == "debug"}


def verifier_options(settings: ServeSettings) -> dict:
    from ray.serve.config import RequestRouterConfig

    options = {"name": VERIFIER, "max_ongoing_requests": MAX_ONGOING,
               # One GPU each on CUDA; on a CPU the forward threads are --threads, and Ray's CPU count stays free.
               "ray_actor_options": {"num_cpus": 0, "num_gpus": 1 if uses_gpu(settings) else 0},
               "request_router_config": RequestRouterConfig(request_router_class=ROUTER,
                                                            request_routing_stats_period_s=STATS_PERIOD_S,
                                                            request_routing_stats_timeout_s=5.0),
               "logging_config": serve_logging(settings), "graceful_shutdown_timeout_s": DRAIN_S,
               "health_check_period_s": 2.0, "health_check_timeout_s": 30.0}
    if settings.max_replicas is not None:
        low = settings.min_replicas or 1
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": settings.max_replicas,
                                         "initial_replicas": min(max(settings.replicas, low), settings.max_replicas),
                                         "target_ongoing_requests": settings.target_ongoing_requests,
                                         "upscale_delay_s": settings.upscale_delay_s,
                                         "downscale_delay_s": settings.downscale_delay_s,
                                         "look_back_period_s": settings.autoscale_look_back_s}
    else:
        options["num_replicas"] = settings.replicas
    return options


def build_app(settings: ServeSettings):
    from ray import serve

    return serve.deployment(serve.ingress()(VerifierReplica)).options(**verifier_options(settings)).bind(settings)


def serve(settings: ServeSettings) -> int:
    import ray
    from ray import serve as ray_serve

    if settings.port == 0:
        raise ValueError("--port 0 is not supported with replicas: name the port Ray Serve should listen on")

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        tls = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)} \
            if settings.ssl_certfile else {}
        ray_serve.start(http_options={"host": settings.host, "port": settings.port, **tls},
                        logging_config=serve_logging(settings))
        ray_serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        scale = (f"{settings.min_replicas or 1}..{settings.max_replicas} replicas (autoscaling, target "
                 f"{settings.target_ongoing_requests:g} requests each)") if settings.max_replicas else \
            f"{settings.replicas} replicas"
        where = settings.ray_address or "a local Ray cluster"
        print(f"WISP verifier on Ray Serve: {scale} on {where}\n  listening    "
              f"{'https' if tls else 'http'}://{settings.host}:{settings.port}  (/health lists the replicas)",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()
    return 0
