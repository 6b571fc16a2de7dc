#!/bin/bash
# A sweep on SLURM through Hydra's submitit launcher: every job of the grid is one SLURM job, here
# with 4 GPUs in DDP (one task per GPU: tasks_per_node = trainer.devices). submitit starts the tasks
# with srun, so each one has SLURM_PROCID etc. and trains as its rank (global rank 0 writes the files).
# The launching process waits and prints the sweep's summary table (summary.md) at the end.
#
#   pip install hydra-submitit-launcher
#   bash examples/slurm/sweep_submitit.sh
set -euo pipefail
export FLUX_LIGHTNING_CACHE="${FLUX_LIGHTNING_CACHE:-$PWD/cache}"  # shared by every job

python -m flux_lightning -m +experiment=krea_lora \
    hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.timeout_min=600 \
    hydra.launcher.nodes=1 hydra.launcher.gpus_per_node=4 hydra.launcher.tasks_per_node=4 \
    hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=256 \
    trainer=ddp trainer.devices=4 \
    optimizer.lr=1e-4,4e-4 adapter.rank=16,32
