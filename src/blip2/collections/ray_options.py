"""The Ray options of `blip2 label` and `blip2 index` (--engine ray, --ray-address, --ray-actors, ...).
Standard library only: the CLI builds its parser from here and `blip2 --help` must stay instant; Ray itself is
imported by `ray_jobs` when a run asks for it."""

from __future__ import annotations

import argparse
from typing import Any

from blip2.collections.argtypes import non_negative_float, positive_int

ENGINES = ("local", "ray")


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("on a Ray cluster (pip install 'blip2[ray]')")
    g.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process and its decoding workers (default); ray: a Ray Data pipeline, one "
                        "model per actor, this process writing the output")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to run on, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, else a "
                        "local Ray instance for this run)")
    g.add_argument("--ray-actors", type=positive_int, default=None, metavar="N",
                   help="model replicas (default: one per GPU of the cluster; without GPUs, one per 2 CPUs)")
    g.add_argument("--ray-gpus-per-actor", type=non_negative_float, default=None, metavar="G",
                   help="GPUs each actor holds (default: 1 where the cluster has GPUs, else 0)")
    g.add_argument("--ray-cpus-per-actor", type=non_negative_float, default=None, metavar="C",
                   help="CPUs each actor holds, fractions allowed (default: 1, less where the actors would take every "
                        "CPU: the reading stage needs one)")


def ray_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `ray_jobs.label_with_ray` / `index_with_ray` given by the Ray options."""
    return {"ray_address": args.ray_address, "num_actors": args.ray_actors,
            "num_gpus_per_actor": args.ray_gpus_per_actor, "cpus_per_actor": args.ray_cpus_per_actor}


def load_settings(args: argparse.Namespace) -> dict[str, Any]:
    """How each actor loads the model: the CLI's model options (`blip2.load` keywords; device None: the actor's
    GPU if it holds one, else CPU)."""
    return {"device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None),
            "batch_size": getattr(args, "batch_size", None) or 8}
