"""Host time per step: flux_lightning beside diffusers' DreamBooth LoRA script, profiled.

On a GPU the kernels run asynchronously; what the device cannot hide is the host's work between
them: Python, the trainer's loop, the autograd engine's bookkeeping, data loading, logging. This
script measures that work for both trainers on the smallest model, with the settings and inputs of
``vs_reference.py`` (the tiny random-weight Flux folder, 64 px, batch 1, rank-4 LoRA on the
reference's 12 targets, AdamW, fp32; the reference is your copy of
``examples/dreambooth/train_dreambooth_lora_flux.py``, never vendored). Each process runs under
``_host_probe.py``, which profiles a window of steps after a warm-up (``torch.profiler``, CPU) and
splits its wall time into kernel time (inside outermost ``aten::`` ops) and host time (the rest); it
also counts ``aten::`` ops per step (each is a kernel launch or more on a GPU) and times a second,
unprofiled window. Rounds alternate the order of the trainers, so outside load hits all alike;
medians over rounds are reported.

    PYTHONPATH=. python benchmarks/host_time.py --reference /tmp/ref/train_dreambooth_lora_flux.py \\
        --rounds 3 --json benchmarks/results/host_time.json       # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, save_json, table  # noqa: E402
from vs_reference import REFERENCE, TRAINERS, check_reference, command, environment, prepare_inputs, run_once  # noqa: E402

# Beside vs_reference's three: the reference with its own --gradient_checkpointing, to compare with
# flux_lightning's default (checkpointing on), where recomputing the forward adds host work to both.
REFERENCE_GC = "reference_gc"
LABELS = {**TRAINERS, REFERENCE_GC: "diffusers `train_dreambooth_lora_flux.py --gradient_checkpointing`"}

FIELDS = (
    "host_s_per_step",
    "kernel_s_per_step",
    "profiled_s_per_step",
    "plain_s_per_step",
    "outermost_aten_ops_per_step",
    "aten_ops_per_step",
)


def trainer_command(trainer: str, args, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    if trainer == REFERENCE_GC:
        return [*command(REFERENCE, args, model, data, out, steps), "--gradient_checkpointing"]
    return command(trainer, args, model, data, out, steps)


def probed(cmd: list[str]) -> list[str]:
    """The same command line under the probe (``python _host_probe.py <args after python>``)."""
    return [cmd[0], str(HERE / "_host_probe.py"), *cmd[1:]]


def summarise(rounds: dict[str, list[dict]]) -> dict:
    out = {}
    for trainer, results in rounds.items():
        out[trainer] = {
            k: {
                "median": statistics.median(r[k] for r in results),
                "min": min(r[k] for r in results),
                "max": max(r[k] for r in results),
            }
            for k in FIELDS
        }
    for trainer, st in out.items():  # checkpointing rows against the reference with checkpointing
        base = out.get(REFERENCE_GC if trainer in (REFERENCE_GC, "flux_lightning_gc") else REFERENCE)
        if base:
            st["host_ratio_to_reference"] = st["host_s_per_step"]["median"] / base["host_s_per_step"]["median"]
            st["aten_ops_ratio_to_reference"] = (
                st["outermost_aten_ops_per_step"]["median"] / base["outermost_aten_ops_per_step"]["median"]
            )
    return out


def markdown(summary: dict) -> str:
    header = [
        "trainer",
        "host ms/step (min-max)",
        "host ratio to the reference (same checkpointing)",
        "kernel ms/step",
        "outermost aten ops/step (ratio)",
        "all aten ops/step",
        "profiled / unprofiled ms/step",
    ]
    rows = []
    for trainer, st in summary.items():

        def ms(key, st=st):
            return f"{st[key]['median'] * 1e3:.1f}"

        rows.append(
            [
                LABELS[trainer],
                f"**{ms('host_s_per_step')}** ({st['host_s_per_step']['min'] * 1e3:.1f}-"
                f"{st['host_s_per_step']['max'] * 1e3:.1f})",
                f"{st.get('host_ratio_to_reference', float('nan')):.2f}x",
                ms("kernel_s_per_step"),
                f"{st['outermost_aten_ops_per_step']['median']:.0f} ({st.get('aten_ops_ratio_to_reference', 1):.2f}x)",
                f"{st['aten_ops_per_step']['median']:.0f}",
                f"{ms('profiled_s_per_step')} / {ms('plain_s_per_step')}",
            ]
        )
    return table(header, rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, help="path to diffusers' train_dreambooth_lora_flux.py")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps before the profiled window")
    p.add_argument("--steps", type=int, default=10, help="steps per window")
    p.add_argument("--windows", type=int, default=7, help="profiled windows per process (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--trainers", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if {REFERENCE, REFERENCE_GC} & set(args.trainers):
        check_reference(args.reference)
    work = args.work or Path(tempfile.mkdtemp(prefix="flux-host-time-"))
    model, data = prepare_inputs(work, args.images)
    env = environment(args.threads, "cpu")
    total = args.skip + (args.windows + 1) * args.steps + 1
    env.update(HOST_PROBE_SKIP=str(args.skip), HOST_PROBE_STEPS=str(args.steps), HOST_PROBE_WINDOWS=str(args.windows))
    rounds: dict[str, list[dict]] = {t: [] for t in args.trainers}
    for r in range(args.rounds):
        order = args.trainers if r % 2 == 0 else args.trainers[::-1]
        for trainer in order:
            out = work / f"{trainer}-{r}"
            out.mkdir(parents=True)
            probe = out / "probe.json"
            run = run_once(
                probed(trainer_command(trainer, args, model, data, out, total)),
                out,
                {**env, "HOST_PROBE_OUT": str(probe)},
                out / "log.txt",
            )
            result = json.loads(probe.read_text())
            result["load_before"], result["load_after"] = run["load_before"], run["load_after"]
            rounds[trainer].append(result)
            print(
                f"round {r} {trainer}: host {result['host_s_per_step'] * 1e3:.1f} ms/step, "
                f"{result['outermost_aten_ops_per_step']:.0f} outermost aten ops/step",
                flush=True,
            )
    summary = summarise(rounds)
    print(f"machine: {machine()}")
    print(markdown(summary))
    result = {
        "machine": machine(),
        "threads": args.threads,
        "skip": args.skip,
        "steps": args.steps,
        "windows": args.windows,
        "rounds": rounds,
        "summary": summary,
        "reference": str(args.reference),
    }
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
