"""CIDEr-D reward throughput (SCST): candidates scored per second against 5 references each,
first sight of the references vs cached, and the time to build the document frequencies.

    .venv/bin/python benchmarks/cider_throughput.py
"""

from __future__ import annotations

import random
import time

from mplug.cider import CiderD


def main() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]

    def sentence() -> str:
        return " ".join(
            rng.choice(vocab[:300] if rng.random() < 0.7 else vocab) for _ in range(rng.randint(8, 14))
        )

    corpus = [[sentence() for _ in range(5)] for _ in range(20000)]
    t = time.perf_counter()
    scorer = CiderD(corpus)
    build = time.perf_counter() - t
    images = rng.sample(range(len(corpus)), 1000)
    candidates = [sentence() for _ in images for _ in range(5)]  # 5 samples per image, as SCST
    references = [corpus[i] for i in images for _ in range(5)]
    for run in ("first sight of the references", "references cached"):
        t = time.perf_counter()
        scorer.score(candidates, references)
        elapsed = time.perf_counter() - t
        print(
            f"{run}: {len(candidates)} candidates × 5 refs in {elapsed:.2f}s = {len(candidates) / elapsed:,.0f}/s"
        )
    print(f"document frequencies of {len(corpus)} images × 5 references: {build:.1f}s")


if __name__ == "__main__":
    main()
