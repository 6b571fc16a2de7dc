"""Ranks started by a launcher (srun, torchrun, submitit), not by Lightning: each process knows its rank
from the environment (Lightning's cluster environments); only global rank 0 locks the run dir and writes
the run's files, every rank trains. Real processes: 2 CPU ranks over gloo on 127.0.0.1, a free port."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flux_lightning.run.rundir import is_global_zero, launcher_rank
from flux_lightning.run.train import config_dir

from ..support.cli import flux_lightning

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "examples" / "slurm"
LAUNCH_VARS = (
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NNODES",
    "SLURM_JOB_NAME",
    "SLURM_JOB_ID",
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LSB_JOBID",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# small and quick: the tiny demo, 4 images of 64 px, batch 1 per rank, 3 steps, no evaluation
QUICK = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=3",
    "dataset.demo_images=4",
    "dataset.batch_size=1",
    "callbacks.validation=null",
    "callbacks.eval_loss=null",
    "callbacks.clip_score=null",
    "logger=csv",
]


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_the_rank_comes_from_each_launchers_variables(no_launcher):
    env = no_launcher
    assert (launcher_rank(), is_global_zero()) == (None, True)  # a plain run
    env.setenv("LOCAL_RANK", "1")  # a child rank Lightning started
    assert (launcher_rank(), is_global_zero()) == (None, False)
    env.delenv("LOCAL_RANK")
    env.setenv("NODE_RANK", "1")  # Lightning's rank 0 of the second machine
    assert (launcher_rank(), is_global_zero()) == (None, False)
    env.delenv("NODE_RANK")
    # srun task 1 of 2 on one node (and submitit's tasks, which srun starts)
    for k, v in dict(
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_PROCID="1",
        SLURM_LOCALID="1",
        SLURM_NODEID="0",
        SLURM_JOB_NAME="flux-lora",
    ).items():
        env.setenv(k, v)
    assert (launcher_rank(), is_global_zero()) == (1, False)
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_LOCALID", "0")
    assert (launcher_rank(), is_global_zero()) == (0, True)
    env.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's rule: an interactive allocation is no launcher
    assert launcher_rank() is None
    for k in (
        "SLURM_NTASKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_NODEID",
        "SLURM_JOB_NAME",
    ):
        env.delenv(k)
    # torchrun's second node: global rank 1, local rank 0 (the old check took the lock here)
    for k, v in dict(
        TORCHELASTIC_RUN_ID="r", RANK="1", LOCAL_RANK="0", GROUP_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1"
    ).items():
        env.setenv(k, v)
    assert (launcher_rank(), is_global_zero()) == (1, False)


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = "\n".join(
        f"--- rank {k} (exit {p.returncode}):\n{log.read_text()[-2500:]}" for k, (p, log) in enumerate(zip(procs, logs))
    )
    assert codes == [0] * len(procs), report


def _one_run_by_rank_zero(run: Path, rank0_pid: int, logs: list[Path], other_log: str) -> None:
    """Every rank trained (DDP needs both for every step), rank 0 alone locked the dir and wrote the run's files."""
    assert (run / ".lock").read_text().strip() == str(rank0_pid), "the lock is not rank 0's"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 3 and result["summary"]["strategy"] == "ddp"
    assert result["summary"]["devices"].startswith(("2 x cpu", "1 x cpu [0] per node, 2 nodes")), result["summary"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run / "lora" / "README.md").is_file()
    assert (run / ".hydra" / "config.yaml").is_file() and (run / other_log).is_file()
    assert "run dir " in logs[0].read_text() and "run dir " not in logs[1].read_text()  # the summary: rank 0's
    assert "error" not in logs[1].read_text().lower()


@pytest.mark.slow
def test_the_sbatch_files_srun_starts_two_tasks_that_train_one_run(tmp_path):
    """examples/slurm/train.sbatch run by bash as SLURM would, with an `srun` that starts its tasks here
    (SLURM_PROCID / SLURM_LOCALID per task, as srun sets them; submitit's tasks get the same)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    srun = bin_dir / "srun"
    srun.write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys\n"
        "n = int(os.environ['SLURM_NTASKS_PER_NODE']) * int(os.environ['SLURM_NNODES'])\n"
        "procs = []\n"
        "for k in range(n):\n"
        "    env = {**os.environ, 'SLURM_NTASKS': str(n), 'SLURM_PROCID': str(k), 'SLURM_LOCALID': str(k), 'SLURM_NODEID': '0'}\n"
        "    log = open(os.path.join(os.environ['FAKE_SRUN_LOGS'], f'task{k}.log'), 'w')\n"
        "    procs.append(subprocess.Popen(sys.argv[1:], env=env, stdout=log, stderr=subprocess.STDOUT))\n"
        "    open(os.path.join(os.environ['FAKE_SRUN_LOGS'], f'task{k}.pid'), 'w').write(str(procs[-1].pid))\n"
        "sys.exit(max(p.wait() for p in procs))\n"
    )
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = _clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SRUN_LOGS=str(tmp_path),
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="flux-lora",
        SLURM_NNODES="1",
        SLURM_NTASKS_PER_NODE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        FLUX_LIGHTNING_CACHE=str(tmp_path / "cache"),
    )
    proc = subprocess.run(
        ["bash", str(SLURM / "train.sbatch"), "run_name=slurm", *QUICK],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = [tmp_path / f"task{k}.log" for k in (0, 1)]
    report = "\n".join(f"--- task {k}:\n{log.read_text()[-2500:]}" for k, log in enumerate(logs) if log.is_file())
    assert proc.returncode == 0, proc.stderr[-2000:] + report
    pid0 = int((tmp_path / "task0.pid").read_text())
    _one_run_by_rank_zero(tmp_path / "outputs" / "runs" / "slurm", pid0, logs, "train_rank1.log")


@pytest.mark.slow
def test_torchrun_ranks_on_two_nodes_train_one_run(tmp_path):
    """torchrun's variables for two nodes of one process each (rank 1 is LOCAL_RANK 0 of node 1),
    as the README's torchrun command sets them."""
    run, port = tmp_path / "run", _free_port()
    cmd = flux_lightning(
        "trainer=ddp",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        f"hydra.run.dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *QUICK,
    )
    procs, logs = [], []
    for rank in (0, 1):
        env = _clean_env(
            TORCHELASTIC_RUN_ID="test",
            RANK=str(rank),
            LOCAL_RANK="0",
            GROUP_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        logs.append(tmp_path / f"rank{rank}.log")
        procs.append(_start(cmd, env, logs[-1], tmp_path))
    _wait(procs, logs)
    _one_run_by_rank_zero(run, procs[0].pid, logs, "train_rank1.log")


def test_the_submitit_recipe_composes_with_ddp_over_its_tasks(tmp_path):
    """examples/slurm/sweep_submitit.sh: every override of ours exists (the launcher's own are Hydra's
    submitit plugin's), and each job's DDP spans the tasks submitit starts (tasks_per_node = devices)."""
    text = (SLURM / "sweep_submitit.sh").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.strip().startswith("python -m flux_lightning -m"))
    args = shlex.split(line)[4:]
    ours = [a for a in args if not a.startswith(("hydra/launcher=", "hydra.launcher."))]
    launcher = dict(a.split("=", 1) for a in args if a.startswith("hydra.launcher."))
    assert launcher["hydra.launcher.tasks_per_node"] == launcher["hydra.launcher.gpus_per_node"]
    swept = [re.sub(r"=([^,]+),.*", r"=\1", a) for a in ours]  # the first value of each swept list
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*swept, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}"])
    assert cfg.trainer.strategy == "ddp" and str(cfg.trainer.devices) == launcher["hydra.launcher.tasks_per_node"]


def test_a_failed_rank_that_lightning_started_fails_the_run(tmp_path):
    """The launching process waits for the ranks Lightning started; one that exited non-zero makes the
    run's exit status non-zero, naming the rank and its log."""
    from types import SimpleNamespace

    from flux_lightning.errors import RankFailed
    from flux_lightning.run.train import wait_for_child_ranks

    ok, bad = (subprocess.Popen([sys.executable, "-c", f"raise SystemExit({c})"]) for c in (0, 3))
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[ok, bad])))
    with pytest.raises(RankFailed, match=rf"rank 2 exited with 3 \(its log: {tmp_path}/train_ddp_process_2.log\)"):
        wait_for_child_ranks(trainer, str(tmp_path))
    wait_for_child_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=None)), str(tmp_path))  # one process


def test_a_sweep_rerun_in_a_lightning_child_rank_says_so_in_one_line(no_launcher, capsys):
    from flux_lightning.run.rundir import MULTIRUN_DDP_WARNING, RunDirLock

    RunDirLock().on_multirun_start(config=None)
    assert capsys.readouterr().err == ""  # the sweep's own process
    no_launcher.setenv("LOCAL_RANK", "1")
    RunDirLock().on_multirun_start(config=None)
    assert capsys.readouterr().err == f"warning: {MULTIRUN_DDP_WARNING}\n"
