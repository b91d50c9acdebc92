"""`mplug env`: what this environment would run with."""

from __future__ import annotations

import argparse
import platform
import sys

from jobs.cli import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "env",
        help="print library versions, devices, Ray reachability, tokenizer path",
        description="What this environment would run with: Python, torch, Ray, transformers and timm "
        "versions, CPUs and GPUs, the packaged tokenizer, and whether a Ray cluster answers. Exit "
        "status 1 when the packaged tokenizer is missing.",
        examples=["mplug env", "mplug env --address ray://head:10001"],
    )  # fmt: skip
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to probe, e.g. ray://host:10001 or host:6379 (default: $RAY_ADDRESS, else none)",
    )
    p.set_defaults(func=run)


def collect(address: str | None) -> dict[str, str]:
    """Environment facts as ordered name → value strings."""
    import os

    import ray
    import timm
    import torch
    import transformers

    from mplug.tokenizer import tokenizer_path

    info: dict[str, str] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "cpus": str(os.cpu_count()),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = f"{len(names)}: " + ", ".join(names)
    else:
        info["gpus"] = "0 (CPU only)"
    try:
        info["tokenizer"] = str(tokenizer_path())
    except FileNotFoundError as err:
        info["tokenizer"] = f"MISSING: {err}"
    address = address or os.environ.get("RAY_ADDRESS")
    info["ray cluster"] = _probe_cluster(address) if address else "none requested (--address or $RAY_ADDRESS)"
    return info


def _probe_cluster(address: str) -> str:
    import ray

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        res = ray.cluster_resources()
        return f"reachable at {address}: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
    except (ConnectionError, RuntimeError, ValueError) as err:
        return f"NOT reachable at {address}: {type(err).__name__}: {str(err).splitlines()[0]}"
    finally:
        if ray.is_initialized():
            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    info = collect(args.address)
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0 if not info["tokenizer"].startswith("MISSING") else 1
