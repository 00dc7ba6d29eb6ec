"""benchmarks/gpu.py off the GPU: without CUDA it says so in one JSON line and writes nothing; ``--device cpu --quick``
(a smoke run of its measuring code, tiny sizes) measures every part on the CPU and labels the figures as CPU ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"
RESULT = REPO / "benchmarks" / "results" / "gpu.json"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _result_stamp():
    return RESULT.stat().st_mtime_ns if RESULT.exists() else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_without_cuda_it_skips_in_one_json_line_and_writes_nothing():
    before = _result_stamp()
    done = _run("--quick", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["benchmark"] == "gpu"
    assert "no CUDA device" in line["skipped"]
    assert _result_stamp() == before


def test_cpu_smoke_run_measures_every_part(tmp_path):
    """Scoring (DPA and knn), training (a progressive-free DPA, a two-phase GAN, a plain autoencoder and a fit-only
    detector) and the pipeline, on the CPU configs; about 40 s on one core."""
    before = _result_stamp()
    out = tmp_path / "gpu.json"
    done = _run("--device", "cpu", "--quick", "--cache", str(tmp_path / "cache"), "--out", str(out),
                "--detectors", "dpa,ae,fanogan,knn", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result
    assert _result_stamp() == before                       # a CPU run writes only --out
    assert result["device"] == "cpu" and result["mode"] == "smoke" and "cpu_smoke" in result
    assert result["environment"]["measured_on"] == "cpu"

    models = result["scoring"]["models"]
    assert set(models) == {"dpa", "knn"}
    for model in models.values():
        assert "error" not in model, model
        rows = model["runs"]
        assert {(r["precision"], r["batch_size"]) for r in rows} == {(p, b) for p in ("fp32", "bf16") for b in (8, 16)}
        for row in rows:
            assert row["tiles_per_s_median"] > 0 and len(row["tiles_per_s_runs"]) == 2
            assert 0 <= row["data_wait_share_median"] <= 1
    assert models["knn"]["bank_entries"] > 0

    detectors = result["training"]["detectors"]
    assert set(detectors) == {"dpa", "ae", "fanogan", "knn"}
    for name in ("dpa", "ae", "fanogan"):
        row = detectors[name]
        assert "error" not in row, row
        assert sum(p["iterations"] for p in row["phases"]) == row["num_steps"]
        assert all(p["iterations_per_s"] > 0 and p["timed_steps"] == 2 for p in row["phases"])
        assert row["projected_hours"] > 0 and row["loop"]["iterations_per_s"] > 0
    assert [p["phase"] for p in detectors["fanogan"]["phases"]] == ["gan", "encoder"]
    assert detectors["knn"]["fit_only"] and detectors["knn"]["fit_seconds_median"] > 0

    pipeline = result["pipeline"]
    assert "error" not in pipeline, pipeline
    assert pipeline["n_tiles"] > 0 and pipeline["slides_per_hour"] > 0
    assert {"preprocess", "score", "aggregate", "overlay"} <= set(pipeline["task_seconds_median"])
    assert pipeline["runs"][0]["score_device"] == "cpu"
