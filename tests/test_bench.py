"""`make bench` runs end to end on a few images and writes what the README reads from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transinv.engine.data import builtin_images_dir
from transinv.engine.prefetch import usable_cores

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


@pytest.mark.slow
def test_bench_writes_paired_ratios_and_a_steady_state(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, str(BENCH), "--models", "mobilenet_v3_small", "--data", str(builtin_images_dir()),
                    "--images", "8", "--batch-size", "2", "--shift", "0..2", "--rounds", "2", "--no-lie",
                    "--no-metric-rows", "--startup-repeats", "0", "--memory-images", "", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["bare_images_per_s"] > 0 and {"output", "layers"} <= set(result["rows"])
    for row in result["rows"].values():
        assert len(row["rounds"]) == 2  # every round kept; the figure is their median
        for timed in row["rounds"]:  # four batches: a steady state, as a ratio to the bare passes around it
            assert timed["steady_state"] and timed["views_per_s"] > 0 and timed["ratio"] == pytest.approx(timed["views_per_s"] / timed["bare_images_per_s"])
        assert min(r["ratio"] for r in row["rounds"]) <= row["ratio"] <= max(r["ratio"] for r in row["rounds"])


@pytest.mark.slow
def test_bench_times_the_chosen_rows_at_the_chosen_thread_count(tmp_path: Path) -> None:
    """``--threads 1`` leaves a core free (the prefetch's default flips, and the row set with it);
    ``--rows`` times only the rows named; an unknown row name is refused with the list."""
    out = tmp_path / "results.json"
    flipped = "output, no prefetch" if usable_cores() > 1 else "output, prefetch"  # on one core none is free
    common = [sys.executable, str(BENCH), "--models", "mobilenet_v3_small", "--data", str(builtin_images_dir()),
              "--images", "8", "--batch-size", "2", "--shift", "0..1", "--rounds", "1", "--no-lie", "--no-metric-rows",
              "--startup-repeats", "0", "--memory-images", "", "--threads", "1", "--out", str(out)]
    subprocess.run(common + ["--rows", f"output; {flipped}"], check=True, capture_output=True, text=True,
                   timeout=600)
    report = json.loads(out.read_text())
    assert report["machine"]["torch_threads"] == 1
    assert list(report["settings"]["rows"]) == ["output", flipped]
    (result,) = report["results"]
    assert list(result["rows"]) == ["output", flipped] and "layers_ratio" not in result
    refused = subprocess.run(common + ["--rows", "output; sideways"], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "no row named sideways" in refused.stderr
    empty = subprocess.run(common + ["--rows", " ; "], capture_output=True, text=True, timeout=600)
    assert empty.returncode != 0 and "name at least one row" in empty.stderr
    negative = subprocess.run(common + ["--threads", "-1"], capture_output=True, text=True, timeout=600)
    assert negative.returncode != 0 and "Traceback" not in negative.stderr and "--threads" in negative.stderr
