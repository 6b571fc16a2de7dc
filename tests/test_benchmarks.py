"""The benchmark scripts run (they are measured by hand, see benchmarks/README.md; nothing here is timed)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

BENCH = REPO / "benchmarks"


def _run(script, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real benchmark")
def test_gpu_benchmark_skips_cleanly_without_cuda():
    proc = _run("gpu_flux_step.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped: no CUDA device" in proc.stdout


@pytest.mark.slow
def test_gpu_benchmark_code_path_runs_on_a_tiny_architecture(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("gpu_flux_step.py", "--smoke", "--bases", "bf16", "int8_quanto", "--resolutions", "512",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["base"] for c in result["cases"]] == ["bf16", "int8_quanto"]
    assert all(c["s_per_step"] > 0 for c in result["cases"])


@pytest.mark.slow
def test_cpu_benchmarks_run_and_print_their_tables(tmp_path):
    proc = _run("step_overhead.py", "--steps", "4", "--rounds", "1", "--threads", "1", "--json", str(tmp_path / "o.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| flux_lightning (Lightning Trainer) |" in proc.stdout
    assert json.loads((tmp_path / "o.json").read_text())["ratio"] > 0
    proc = _run("tread.py", "--tokens", "64", "--steps", "1", "--threads", "1", "--json", str(tmp_path / "t.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 64 |" in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text())["cases"][0]["speedup"] > 0


@pytest.mark.slow
def test_soak_short_mode_samples_memory_fds_and_disk(tmp_path):
    out = tmp_path / "soak.json"
    proc = _run("soak.py", "--short", "--dir", str(tmp_path / "soak"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rss_mib |" in proc.stdout and "| fds |" in proc.stdout and "| disk_mib |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["steps"] == 30 and result["samples_training"] >= 2
    assert all(s["rss_mib"] > 0 and s["fds"] > 0 for s in result["samples"])
    assert result["summary"]["disk_mib"]["max"] > 0


@pytest.mark.slow
def test_startup_benchmark_breaks_down_command_to_first_step(tmp_path):
    out = tmp_path / "startup.json"
    proc = _run("startup.py", "--quick", "--warm-runs", "1", "--steps", "1", "--json", str(out), "--dir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **command -> first optimizer step** |" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["warm_runs"][0]["rows"]
    for phase in ("interpreter + imports", "datamodule.prepare_data", "module.configure_model",
                  "ValidationImages.on_train_start", "EvalLoss.on_train_start", "first optimizer step"):
        assert rows[phase] >= 0, phase
    first = result["warm_runs"][0]["first_step_s"]
    assert abs(sum(rows.values()) - first) < 0.05 * first  # the rows add up to command -> first step
