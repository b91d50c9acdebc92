"""`mplug demo`: the main job end to end on the embedded default."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the project end to end on the embedded default, locally")
    p.add_argument("--output", default="demo_out", help="folder (or URI) for every artefact")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from jobs.env_cmd import collect
    from pipelines.cluster import init_ray

    print("== mplug demo: environment")
    for key, value in collect(None).items():
        print(f"  {key:<12} {value}")

    print("== starting a local Ray instance")
    t0 = time.perf_counter()
    info = init_ray("local")
    print(f"  ready in {time.perf_counter() - t0:.1f}s: {info.cpus:g} logical CPUs, {info.gpus:g} GPUs")
    try:
        squares = ray.get([ray.remote(lambda x: x * x).remote(i) for i in range(4)])
        print(f"  ran 4 Ray tasks: {squares}")
    finally:
        ray.shutdown()
    print("== demo finished: environment checked, local Ray started, ran tasks and stopped")
    return 0
