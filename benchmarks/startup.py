"""Command-to-first-step of the README's default run (``python -m flux_lightning``), warm caches.

    PYTHONPATH=. python benchmarks/startup.py [--warm-runs 3] [--steps 3] [--json out.json]

Runs the default command (tiny flavour, demo data, default callbacks) in a fresh working directory
``1 + --warm-runs`` times, all with one ``paths.cache_dir``: the first run fills the caches (the
tiny model folder, the demo images, the VAE latents and text embeddings, the tiny CLIP), the others
find them warm (Python's bytecode cache included: ``PYTHONDONTWRITEBYTECODE`` is unset for the
runs). Each run sets ``FLUX_LIGHTNING_TIMINGS`` (see :mod:`flux_lightning.run.timings`), so the
process appends when each start-up phase ends; the script subtracts the moment it launched the
command. Reported per run, in order: interpreter + imports, Hydra compose, validate, building the
callbacks / datamodule / module / trainer, ``prepare_data``, ``setup``, the callbacks' ``setup``
(the CLIP model load), ``configure_model`` (transformer load + adapter), the before-training
baselines of the default callbacks (validation images, their CLIP score, the eval loss: the README's
default run does these before step 1, so they are counted, each on its own row), Lightning's own
work between hooks, the first batch and the first optimizer step. The table gives the median of
the warm runs and their spread (min-max). After each warm run a process that only imports the
third-party packages the run needs before step 1 (:data:`FLOOR_IMPORTS`) is timed: the floor; so
are issue 25's floor (torch + diffusers' Flux transformer) and the same with full collections
postponed as the command line does (what of the margin to that floor is the garbage collector).
``--without bitsandbytes`` adds, interleaved, warm runs as if bitsandbytes were not installed (peft
imports it on every run, with ``torch.compile``'d kernels that import the inductor): what
``pip uninstall bitsandbytes`` saves a user who needs neither NF4 nor 8-bit optimizers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine, save_json, table  # noqa: E402

# point marks -> the row that ends there (time since the previous phase ended)
POINTS = {
    "imported": "interpreter + imports",
    "composed": "Hydra compose (+ run dir, logging)",
    "validated": "validate config",
    "callbacks built": "instantiate callbacks",
    "datamodule built": "instantiate datamodule",
    "module built": "instantiate module",
    "trainer built": "instantiate trainer",
    "first batch loaded": "first batch (dataloader)",
    "first optimizer step": "first optimizer step",
}
# What the default run imports before step 1 from third-party packages, nothing else: the floor no
# change inside flux_lightning can go under (measured in its own process after each warm run).
FLOOR_IMPORTS = (
    "import torch, lightning, hydra, omegaconf, torch.utils.tensorboard, optimi, peft; "
    "from diffusers import FluxTransformer2DModel, FluxPipeline, AutoencoderKL; "
    "from transformers import CLIPModel, CLIPProcessor; "
    "from torchmetrics.multimodal.clip_score import CLIPScore"
)
# Issue 25's floor: a process that imports only torch and diffusers' Flux transformer (what any Flux
# trainer must import); the goal is command -> first step within 1.5 s of it.
TORCH_DIFFUSERS_IMPORTS = "import torch; from diffusers import FluxTransformer2DModel"
# The same imports with full collections postponed as the command line postpones them
# (flux_lightning/run/heap.py): how much of the margin to the floor is the collector.
TORCH_DIFFUSERS_POSTPONED = "import gc; gc.set_threshold(700, 10, 1 << 30); " + TORCH_DIFFUSERS_IMPORTS
BEFORE_TRAINING = (
    "ValidationImages.on_train_start",
    "CLIPScoreCallback.on_validation_images",
    "EvalLoss.on_train_start",
)
GLUE = "Lightning between hooks"


def read_timings(path: Path, launched: float) -> list[dict]:
    """The process's phases as ``{phase, start, end}`` seconds since launch, in order of their end."""
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for e in events:
        e["start"] -= launched
        e["end"] -= launched
    return sorted(events, key=lambda e: (e["end"], -e["start"]))


def breakdown(events: list[dict]) -> dict[str, float]:
    """Seconds per row, adding up to the first optimizer step.

    A point mark's row is the time since the previous phase ended. A timed hook's row is its own
    duration minus the hooks nested in it (the CLIP score runs inside the validation callback's
    ``on_train_start``); the time between the previous phase's end and a hook's start is Lightning's.
    """
    rows: dict[str, float] = defaultdict(float)
    end = 0.0
    top: list[dict] = []
    for e in events:
        if any(
            o is not e and o["start"] <= e["start"] and e["end"] <= o["end"] and o["end"] > o["start"] for o in events
        ):
            continue  # nested: accounted below
        top.append(e)
    for e in top:
        if e["end"] == e["start"]:  # a point
            rows[POINTS.get(e["phase"], e["phase"])] += e["end"] - end
        else:
            rows[GLUE] += max(0.0, e["start"] - end)
            nested = [o for o in events if o is not e and e["start"] <= o["start"] and o["end"] <= e["end"]]
            for o in nested:
                rows[o["phase"]] += o["end"] - o["start"]
            rows[e["phase"]] += (e["end"] - e["start"]) - sum(o["end"] - o["start"] for o in nested)
        end = e["end"]
        if e["phase"] == "first optimizer step":
            break
    return dict(rows)


def blocking_site(root: Path, packages: list[str]) -> str | None:
    """A folder with a ``sitecustomize.py`` that makes ``packages`` unimportable (``sys.modules[name] =
    None``), as if they were not installed: measures what uninstalling them would save. None if none."""
    if not packages:
        return None
    folder = root / "without"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in packages))
    return str(folder)


def run_once(workdir: Path, cache: Path, steps: int, extra: list[str], site: str | None = None) -> dict:
    workdir.mkdir(parents=True)
    timings = workdir / "timings.jsonl"
    env = {**os.environ, "FLUX_LIGHTNING_TIMINGS": str(timings)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # warm = bytecode cached too, as on a user's machine
    paths = (site, str(REPO), os.environ.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, "-m", "flux_lightning", f"trainer.max_steps={steps}", f"paths.cache_dir={cache}", *extra]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - launched
    (workdir / "stdout.txt").write_text(proc.stdout)
    (workdir / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = read_timings(timings, launched)
    first = next(e["end"] for e in events if e["phase"] == "first optimizer step")
    return {"wall_s": round(wall, 3), "first_step_s": round(first, 3), "rows": breakdown(events), "events": events}


def import_floor(imports: str = FLOOR_IMPORTS) -> float:
    """Seconds from launching a process that only runs ``imports`` to the end of its imports (its
    exit, seconds of interpreter teardown, is not counted: the run's first step isn't either)."""
    code = imports + "; import time; print(time.time())"
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    return float(proc.stdout.strip().splitlines()[-1]) - launched


def import_profile(top: int = 12) -> list[tuple[str, float]]:
    """``python -X importtime -c 'import flux_lightning.run.train'``: seconds of self time per top-level package."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import flux_lightning.run.train"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    per: dict[str, float] = defaultdict(float)
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            per[m[3].split(".")[0]] += int(m[1]) / 1e6
    return [(k, round(v, 3)) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]]


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _cell(st: dict[str, float], bold: bool = False) -> str:
    median = f"**{st['median']:.2f}**" if bold else f"{st['median']:.2f}"
    return f"{median} ({st['min']:.2f}-{st['max']:.2f})"


def summarize(runs: list[dict]) -> dict:
    """Median and spread of every row, of command -> first step, of the before-training baselines and
    of the first step without them, over ``runs``."""
    names = list(dict.fromkeys(n for r in runs for n in r["rows"]))
    firsts = [r["first_step_s"] for r in runs]
    baselines = [sum(r["rows"].get(n, 0.0) for n in BEFORE_TRAINING) for r in runs]
    return {
        "rows": {n: _stats([r["rows"].get(n, 0.0) for r in runs]) for n in names},
        "first_step_s": _stats(firsts),
        "baselines_s": _stats(baselines),
        "first_step_without_baselines_s": _stats([f - b for f, b in zip(firsts, baselines)]),
    }


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="trainer.max_steps of each run")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--without",
        nargs="*",
        default=[],
        metavar="PACKAGE",
        help="also time each warm run as if these packages were not installed, interleaved "
        "(e.g. bitsandbytes, which peft imports on every run)",
    )
    ap.add_argument("--quick", action="store_true", help="skip the import floor and the import profile")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="flux-startup-"))
    cache = root / "cache"
    site = blocking_site(root, args.without)
    load_before = os.getloadavg()
    cold = run_once(root / "cold", cache, args.steps, args.overrides)
    warm, bare, floor, torch_floor, postponed_floor = [], [], [], [], []
    for i in range(1, args.warm_runs + 1):  # interleaved: outside load hits every variant alike
        warm.append(run_once(root / f"warm{i}", cache, args.steps, args.overrides))
        if site:
            bare.append(run_once(root / f"without{i}", cache, args.steps, args.overrides, site))
        if not args.quick:
            floor.append(import_floor())
            torch_floor.append(import_floor(TORCH_DIFFUSERS_IMPORTS))
            postponed_floor.append(import_floor(TORCH_DIFFUSERS_POSTPONED))
    load_after = os.getloadavg()
    result = {
        "machine": machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "command": f"python -m flux_lightning trainer.max_steps={args.steps} paths.cache_dir=<shared> {' '.join(args.overrides)}".strip(),
        "cold": {k: cold[k] for k in ("wall_s", "first_step_s", "rows")},
        "warm_runs": [{k: r[k] for k in ("wall_s", "first_step_s", "rows")} for r in warm],
        "warm": summarize(warm),
        "third_party_import_floor_s": _stats(floor) if floor else None,
        "torch_diffusers_floor_s": _stats(torch_floor) if torch_floor else None,
        "torch_diffusers_floor_postponed_gc_s": _stats(postponed_floor) if postponed_floor else None,
        "over_torch_diffusers_floor_s": (
            round(statistics.median(r["first_step_s"] for r in warm) - statistics.median(torch_floor), 3)
            if torch_floor
            else None
        ),
        "import_self_time_s": [] if args.quick else import_profile(),
    }
    if site:
        result["without"] = args.without
        result["without_runs"] = [{k: r[k] for k in ("wall_s", "first_step_s", "rows")} for r in bare]
        result["warm_without"] = summarize(bare)
    header = ["phase", "cold s", f"warm s, median of {len(warm)} (min-max)"]
    header += [f"warm without {'+'.join(args.without)}"] if site else []
    rows = []
    for name, st in result["warm"]["rows"].items():
        row = [
            name + (" (before-training baseline)" if name in BEFORE_TRAINING else ""),
            f"{cold['rows'].get(name, 0.0):.2f}",
            _cell(st),
        ]
        if site:
            other = result["warm_without"]["rows"].get(name)
            row.append(_cell(other) if other else "-")
        rows.append(row)
    totals = [
        ("**command -> first optimizer step**", "first_step_s", f"{cold['first_step_s']:.2f}", True),
        ("of which before-training baselines", "baselines_s", "", False),
        ("first step without the baselines", "first_step_without_baselines_s", "", False),
    ]
    for label, key, cold_cell, bold in totals:
        rows.append(
            [label, cold_cell, _cell(result["warm"][key], bold)]
            + ([_cell(result["warm_without"][key], bold)] if site else [])
        )
    if floor:
        rows.append(
            [
                "floor: a process only importing the third-party packages the run needs",
                "",
                _cell(result["third_party_import_floor_s"]),
            ]
            + (["-"] if site else [])
        )
        rows.append(
            [
                "floor of issue 25: `import torch; from diffusers import FluxTransformer2DModel`",
                "",
                _cell(result["torch_diffusers_floor_s"]),
            ]
            + (["-"] if site else [])
        )
        rows.append(
            [
                "the same with full collections postponed, as the command line does (run/heap.py)",
                "",
                _cell(result["torch_diffusers_floor_postponed_gc_s"]),
            ]
            + (["-"] if site else [])
        )
    print(f"machine: {result['machine']}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(table(header, rows))
    if torch_floor:
        print(
            f"first step - torch+diffusers floor (medians): {result['over_torch_diffusers_floor_s']:.2f} s (goal <= 1.5)"
        )
    if result["import_self_time_s"]:
        print("import self time by package (s):", ", ".join(f"{k} {v:.2f}" for k, v in result["import_self_time_s"]))
    save_json(args.json, result)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
