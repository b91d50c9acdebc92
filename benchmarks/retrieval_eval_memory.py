"""Retrieval evaluation during training: peak memory per rank and time, today's path against the
one it replaced (a git revision), on two gloo CPU ranks with the tiny model.

Both paths evaluate the same rows (IMAGES images × CAPTIONS captions, each caption row holding
its transformed image, as the eval stream hands them), each rank half of them:
- new: `pipelines.eval.passes.evaluate_batches` (predictions gathered on rank 0 without images,
  ITC top k there, every rank re-scores the images it reads again with ITM);
- old (`--old REV`, e.g. 1416e56): `pipelines.train.loop._evaluate` of that revision
  (`all_gather_object` of every row with its image to every rank, rank 0 re-ranks alone).

    python benchmarks/retrieval_eval_memory.py --impl new
    python benchmarks/retrieval_eval_memory.py --impl old --old 1416e56

Peak memory is the most the rank's resident set grew during the evaluation (sampled every
20 ms) over what it held before it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeakRSS:
    """The largest resident set seen by a sampling thread while the block runs."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def grew_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _batches(rank: int, world: int, images: int, captions: int, batch: int, cfg):
    """This rank's share of the rows (row n: image n // captions), collated, in a fresh
    iterator per call; every row's image regenerated from its image's seed."""
    import torch

    from mplug.modeling import random_captions

    rows = list(range(rank, images * captions, world))

    def make():
        for s in range(0, len(rows), batch):
            part = rows[s : s + batch]
            pixels = torch.stack([
                torch.randn(3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(n // captions))
                for n in part
            ])  # fmt: skip
            ids, mask = random_captions(
                cfg, len(part), cfg.max_text_len, torch.Generator().manual_seed(s + rank)
            )
            yield {"key": [f"r{n:07d}" for n in part], "image_id": [f"img{n // captions:06d}" for n in part],
                   "image": pixels, "input_ids": ids, "attention_mask": mask,
                   "image_number": torch.tensor([n // captions for n in part])}  # fmt: skip

    return make


class _Shard:
    """What the old `_evaluate` iterates (an eval shard): collated batches."""

    def __init__(self, make) -> None:
        self.make = make

    def iter_torch_batches(self, **_):
        return self.make()


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    if args["impl"] == "old":
        sys.path.insert(0, args["old_root"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(hours=1))  # fmt: skip
    from mplug import MPlugConfig
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config

    job = load_config(None, {"task": "retrieval", "run.max_steps": 1, "retrieval.k_test": args["k"],
                             "data.eval_uris": ["unused"]})  # fmt: skip
    cfg = MPlugConfig.preset("tiny", queue_size=8)
    task = task_class("retrieval")(job, cfg)
    torch.manual_seed(0)
    model = task.build_model().eval()
    make = _batches(rank, world, args["images"], args["captions"], args["batch"], cfg)
    dist.barrier()
    started = time.perf_counter()
    with torch.no_grad(), PeakRSS() as peak:
        if args["impl"] == "old":
            from pipelines.train import loop

            metrics = loop._evaluate(model, task, _Shard(make), job, torch.device("cpu"), rank)
        else:
            from pipelines.distributed import TorchCollective
            from pipelines.eval.passes import evaluate_batches

            metrics = {
                f"eval_{k}": v
                for k, v in evaluate_batches(task, model, make, TorchCollective(), None).metrics.items()
            }
    seconds = time.perf_counter() - started
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "peak_growth_mb": round(peak.grew_mb, 1), "seconds": round(seconds, 1),
                   "r_mean": metrics.get("eval_r_mean")}, f)  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", choices=("new", "old"), default="new")
    parser.add_argument("--old", default="1416e56", help="git revision of the old path (--impl old)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--k", type=int, default=16, help="retrieval.k_test: ITC candidates re-scored by ITM")
    parser.add_argument("--batch", type=int, default=64)
    args = vars(parser.parse_args())
    with tempfile.TemporaryDirectory() as tmp:
        if args["impl"] == "old":
            archive = subprocess.run(["git", "-C", ROOT, "archive", args["old"], "mplug", "pipelines"],
                                     check=True, capture_output=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            args["old_root"] = tmp
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(tmp, "result")
        mp.start_processes(_rank, args=(2, port, args, out), nprocs=2, join=True, start_method="spawn")
        ranks = []
        for r in range(2):
            with open(f"{out}.{r}") as f:
                ranks.append(json.load(f))
    print(json.dumps({"impl": args["impl"], "images": args["images"], "captions": args["captions"], "k": args["k"],
                      "ranks": ranks}))  # fmt: skip


if __name__ == "__main__":
    main()
