"""`blip2 serve`: its options and its run. Standard library only at import time (the CLI builds its parser
from here and `blip2 --help` must stay instant); the model, FastAPI and uvicorn load inside `run`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

DEFAULT_PORT = 8000


def _positive(cast):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes it)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 picks a free one)")
    net.add_argument("--api-key", default=None, metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on every /v1 route (default: $BLIP2_API_KEY, else none)")
    net.add_argument("--allowed-media-domains", nargs="+", default=(), metavar="DOMAIN",
                     help="hosts whose http(s) image URLs may be fetched ('*.example.com' for subdomains); "
                          "default: none, remote URLs are refused")
    net.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                     help="a folder whose files may be named as images (file:// URLs or paths); default: none")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-mb", type=_positive(float), default=20.0, metavar="MB",
                     help="largest request body, refused while it is read (default: %(default)s)")
    lim.add_argument("--max-image-pixels", type=_positive(int), default=40_000_000, metavar="N",
                     help="largest decoded image, width x height (default: %(default)s)")
    lim.add_argument("--max-prompt-tokens", type=_positive(int), default=None, metavar="N",
                     help="longest LLM prompt in tokens (default: what the LLM's context leaves)")
    lim.add_argument("--max-new-tokens", type=_positive(int), default=256, metavar="N",
                     help="most tokens one request may generate (default: %(default)s)")
    lim.add_argument("--request-timeout", type=_positive(float), default=120.0, metavar="S",
                     help="seconds a request may take before it gets 504 (default: %(default)s)")
    lim.add_argument("--fetch-timeout", type=_positive(float), default=10.0, metavar="S",
                     help="seconds to fetch a remote image (default: %(default)s)")
    bat = p.add_argument_group("batching and caching")
    bat.add_argument("--max-batch-size", type=_positive(int), default=16, metavar="N",
                     help="most requests per shared forward pass; 1 turns batching off (default: %(default)s)")
    bat.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                     help="greedy/sampled requests to a decoder-only LLM join the running batch between decode "
                          "steps (default: on; beam search and Flan-T5 always run as whole batches)")
    bat.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                     help="how long the first request of a batch waits for others (default: %(default)s)")
    bat.add_argument("--max-queue", type=_positive(int), default=256, metavar="N",
                     help="jobs waiting beyond which requests get 503 (default: %(default)s)")
    bat.add_argument("--image-cache-mb", type=float, default=512.0, metavar="MB",
                     help="memory for encoded images, by content hash (default: %(default)s; 0 turns it off)")
    bat.add_argument("--prefix-cache-mb", type=float, default=256.0, metavar="MB",
                     help="memory for the LLM's keys/values of finished requests, reused by later requests about "
                          "the same image that start with the same tokens, e.g. chat turns (default: "
                          "%(default)s; 0 turns it off; shared by all clients, so timing can tell one client that "
                          "another sent the same prefix)")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="a photo index built by `blip2 index` with this model, searched at POST /v1/search")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients see in /v1/models (default: --model as given)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default: %(default)s)")
    from blip2.serve.ray_serve import add_ray_serve_arguments

    add_ray_serve_arguments(p)


def build_config(args: argparse.Namespace):
    """The server's settings from the command line; a bad value is a ValueError naming its flag (checked
    before the model loads, so a typo costs no loading time)."""
    from blip2.serve.app import ServerConfig
    from blip2.serve.media import MediaPolicy

    if args.index is not None and not Path(args.index).is_dir():
        raise ValueError(f"--index {args.index} is not a folder (build one with `blip2 index DIR --out INDEX`)")
    return ServerConfig(
        model_name=args.served_model_name or args.model,
        api_key=args.api_key or os.environ.get("BLIP2_API_KEY") or None,
        media=MediaPolicy(
            allowed_domains=tuple(args.allowed_media_domains),
            allowed_local_path=args.allowed_local_media_path,
            max_image_bytes=int(args.max_body_mb * 1024**2),
            max_pixels=args.max_image_pixels,
            fetch_timeout_s=args.fetch_timeout,
        ),
        max_body_bytes=int(args.max_body_mb * 1024**2),
        request_timeout_s=args.request_timeout,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens_limit=args.max_new_tokens,
        index_path=args.index,
    )


def run(args: argparse.Namespace, config, blip2) -> int:
    """Serve `blip2` (a loaded `Blip2`) with `config` (from `build_config`) until Ctrl-C / SIGTERM."""
    import uvicorn
    from fastapi import FastAPI

    from blip2.serve.app import create_app
    from blip2.serve.engine import Engine

    engine = Engine(blip2, max_batch_size=args.max_batch_size, max_wait_s=max(0.0, args.max_wait_ms) / 1000,
                    max_queue=args.max_queue, cache_bytes=int(args.image_cache_mb * 1024**2),
                    continuous=args.continuous_batching, prefix_cache_bytes=int(args.prefix_cache_mb * 1024**2))
    app: FastAPI = create_app(engine, config)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class Server(uvicorn.Server):
        def _log_started_message(self, listeners) -> None:  # the URL, with the port actually bound
            port = listeners[0].getsockname()[1] if listeners else args.port
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"blip2 serve: {config.model_name} on http://{host}:{port}"
                  f"{'  (API key required)' if config.api_key else ''}", flush=True)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   access_log=args.log_level == "debug", timeout_graceful_shutdown=30,
                                   lifespan="on"))
    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"blip2 serve: warning: listening on {args.host} without an API key (--api-key)", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the previous handler;
    # a no-op one makes the process end normally (exit 0) after that clean shutdown instead of dying by it.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("blip2 serve: stopped", flush=True)
    return 0
