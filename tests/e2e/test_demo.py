"""The demo path at its smallest size: synth → ingest → 2-worker pretraining → retrieval."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_learns_retrieval_far_above_chance(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "demo",
            "--output",
            str(out),
            "--num-images",
            "1500",
            "--max-steps",
            "150",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "zero-shot image↔text retrieval" in proc.stdout
    metrics = json.loads((out / "runs" / "demo-tiny" / "retrieval_test.json").read_text())
    for direction in ("i2t", "t2i"):
        # Learning, not luck: R@5 several times the chance level of the same ranking.
        assert metrics[f"{direction}_r5"] > 3 * metrics[f"chance_{direction}_r5"], metrics
    assert (out / "runs" / "demo-tiny" / "final" / "config.json").exists()
    assert (out / "runs" / "demo-tiny" / "curves.png").exists()
