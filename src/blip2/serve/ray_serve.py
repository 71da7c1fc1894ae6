"""`blip2 serve` scaled out: the server's app as a Ray Serve deployment of N replicas (DESIGN §4 "Beyond one
machine"). Each replica loads the model once and runs the same app as `blip2 serve` (`create_app` over its own
`Engine`: batching, image cache, limits, the same routes); Ray Serve's proxy spreads requests over the replicas.
One GPU per replica where the cluster has GPUs, a fraction of a CPU otherwise. Every response carries
`X-Blip2-Replica` (which replica answered). Ray is imported inside the functions only.
"""

from __future__ import annotations

import argparse
from typing import Any

REPLICA_HEADER = "x-blip2-replica"
APP_NAME = "blip2"


def add_ray_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The Ray options of `blip2 serve` (standard library only: the CLI's parser is built from here)."""
    g = p.add_argument_group("on a Ray cluster (pip install 'blip2[ray]')")
    g.add_argument("--ray-replicas", type=int, default=None, metavar="N",
                   help="serve through Ray Serve with N replicas, each with the model (one GPU each where the "
                        "cluster has GPUs); --host/--port are then Ray Serve's HTTP proxy")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster (default: $RAY_ADDRESS, else a local Ray instance)")


def build_app(model: str, config, *, load_kwargs: dict[str, Any] | None = None,
              engine_kwargs: dict[str, Any] | None = None, num_replicas: int = 1,
              num_gpus_per_replica: float | None = None, cpus_per_replica: float | None = None):
    """A bound Ray Serve application (`serve.run(...)` it): `num_replicas` replicas of the blip2 app, each
    loading `model` with `load_kwargs` (`blip2.load` keywords; device None/"auto": the replica's GPU if it holds
    one) and serving `create_app(Engine(blip2, **engine_kwargs), config)`. Resources: by default one GPU per
    replica where the cluster has GPUs, else min(1, CPUs / (2 * replicas)) CPUs (Ray Serve's proxy and
    controller need some too). Call with Ray initialised."""
    import ray
    from ray import serve

    res = ray.cluster_resources()
    if num_gpus_per_replica is None:
        num_gpus_per_replica = 1.0 if res.get("GPU", 0) else 0.0
    if cpus_per_replica is None:
        cpus_per_replica = min(1.0, max(0.1, float(res.get("CPU", 1)) / (2 * num_replicas)))
    load_kwargs, engine_kwargs = dict(load_kwargs or {}), dict(engine_kwargs or {})

    def make_app():  # runs in each replica, when it starts
        from blip2.collections.ray_jobs import load_on_worker
        from blip2.serve.app import create_app
        from blip2.serve.engine import Engine

        app = create_app(Engine(load_on_worker(model, load_kwargs), **engine_kwargs), config)  # its lifespan starts the engine
        replica = _replica_id()

        @app.middleware("http")
        async def _tag(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    deployment = serve.deployment(
        serve.ingress(make_app)(), name="Blip2Server", num_replicas=num_replicas,
        ray_actor_options={"num_gpus": num_gpus_per_replica, "num_cpus": cpus_per_replica},
    )
    return deployment.bind()


def _replica_id() -> str:
    from ray import serve

    ctx = serve.get_replica_context()
    rid = getattr(ctx, "replica_id", None)
    return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or rid)


def serve_with_ray(args: argparse.Namespace, config) -> int:
    """`blip2 serve --ray-replicas N`: deploy, print the URL, and keep serving until Ctrl-C / SIGTERM."""
    import signal
    import threading

    from blip2.collections.ray_jobs import ray_session

    if args.ray_replicas < 1:
        raise ValueError(f"--ray-replicas must be 1 or more, got {args.ray_replicas}")
    with ray_session(args.ray_address):
        from ray import serve

        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(args.model, config, num_replicas=args.ray_replicas,
                        load_kwargs={"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size},
                        engine_kwargs=engine_settings(args))
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"blip2 serve: {config.model_name} on http://{args.host}:{args.port} "
              f"({args.ray_replicas} Ray Serve replicas)", flush=True)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            serve.shutdown()
    print("blip2 serve: stopped", flush=True)
    return 0


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`Engine` keywords from `blip2 serve`'s batching options (as `server.run` builds its engine)."""
    return {"max_batch_size": args.max_batch_size, "max_wait_s": max(0.0, args.max_wait_ms) / 1000,
            "max_queue": args.max_queue, "cache_bytes": int(args.image_cache_mb * 1024**2),
            "continuous": args.continuous_batching,
            "prefix_cache_bytes": int(args.prefix_cache_mb * 1024**2)}
