"""Seconds per step and start-up: flux_lightning side by side with diffusers' DreamBooth LoRA script.

The reference is diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py``, which the user
supplies (``--reference PATH``; it is never vendored or committed). Get it with e.g.
``git -C <diffusers clone> show HEAD:examples/dreambooth/train_dreambooth_lora_flux.py > /tmp/ref.py``.
Both trainers run as separate processes from their command lines (nothing here imports either
trainer's internals), on the same generated inputs:

* the tiny random-weight Flux saved as a diffusers folder (``flux_lightning.model.tiny.ensure_tiny_folder``:
  transformer with a guidance embedding, 16-channel VAE, CLIP and T5 encoders and tokenizers,
  scheduler). The reference loads every component from it with ``--pretrained_model_name_or_path``
  unchanged (T5 tokenizer ``model_max_length`` 512, CLIP 77); flux_lightning loads it with
  ``model=dev model.pretrained_model_name_or_path=<folder>``: the ``dev`` flavour's facts (T5
  length 512, guidance embedding, no attention mask) on the tiny weights. The ``tiny`` flavour's
  own T5 length is 32 and has no config field, hence ``model=dev``.
* ``--images`` generated 64 px PNGs (``flux_lightning.data.demo.make_demo_dataset``), all trained
  with one instance prompt: the reference's local-folder mode has no per-image captions, and with
  one prompt it encodes the text once, as flux_lightning's cache does.

Settings (the issue's; every one is stated on both command lines, see the two ``*_command``
functions):

| setting | reference flag | flux_lightning override |
|---|---|---|
| resolution 64 px, batch 1 | ``--resolution 64 --train_batch_size 1`` | ``dataset.resolution=64 dataset.batch_size=1`` |
| captions: one instance prompt, no dropout | ``--instance_prompt P`` | ``dataset=local dataset.instance_prompt=P dataset.caption_dropout_probability=0`` |
| LoRA rank 4, alpha 4, dropout 0, gaussian init | ``--rank 4 --lora_alpha 4`` (dropout 0 and gaussian init are its defaults) | ``adapter.rank=4 adapter.alpha=4 adapter.dropout=0 adapter.init=gaussian`` |
| the script's 12 default target modules | (its default: no ``--lora_layers``) | ``adapter.target=[attn.to_k,...,ff_context.net.2]`` |
| torch AdamW, lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 1e-4 | ``--learning_rate 1e-4`` (the rest are its defaults) | ``optimizer=adamw optimizer.lr=1e-4 optimizer.weight_decay=1e-4`` |
| constant LR, gradient clipping at norm 1.0 | its defaults | its defaults |
| T5 length 512 | ``--max_sequence_length 512`` | ``model=dev`` (flavour fact) |
| guidance embedding fed 3.5 | its default ``--guidance_scale 3.5`` | ``model.guidance_value=3.5`` |
| fp32 weights and math | ``--mixed_precision no`` | ``model.dtype=fp32 trainer.precision=32-true`` |
| cached latents | ``--cache_latents`` (in memory, every run) | always (on disk; a fresh cache dir every run) |
| no validation, no eval loss, no CLIP score | no ``--validation_prompt`` | ``callbacks.validation=null callbacks.clip_score=null callbacks.eval_loss=null`` |
| no checkpoints | ``--checkpointing_steps 1000000000`` | ``callbacks.model_checkpoint=null`` |
| gradient checkpointing | off (its default) | off (``model.gradient_checkpointing=false``) and, as a second row, on (its default) |
| data loading in the main process | ``--dataloader_num_workers 0`` (its default) | ``dataset.num_workers=0`` (its CPU default) |
| seed 0 | ``--seed 0`` | ``seed=0`` |
| logging | TensorBoard every step (its default ``--report_to``) | TensorBoard every 10 steps (its default logger) |

What stays on: both write the trained LoRA (``pytorch_lora_weights.safetensors``, diffusers keys;
flux_lightning's export in bf16, its default, the reference's in fp32) and show a progress bar;
the reference then loads the full ``FluxPipeline`` again and loads the LoRA into it (its "final
inference", no images without a validation prompt); flux_lightning writes its model card and run
summary. Each run gets a fresh temporary directory (its output and, for flux_lightning, its cache
dir), so each run pays its own latent and text caching, like the reference always does. After the
first round the script checks that the two trainers' LoRA files hold the same tensor names and
shapes (the same adapter is trained); a mismatch stops the benchmark.

Measurement: for every trainer, per step = (wall of an N2-step run - wall of an N1-step run) /
(N2 - N1) (defaults 20 and 220), start-up = wall of the N1 run - N1 * per step; walls are whole
processes (interpreter start to exit). ``--pairs`` rounds each run every trainer's short and long
run, the order reversed every other round, so outside load hits all alike. Every process gets the
same environment: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, Hugging Face offline,
no GPU (``--device cpu``, default; ``--device auto`` lets both see the GPUs), and this checkout of
flux_lightning first on ``PYTHONPATH``. Reported: medians with min/max over the rounds, the
ratio of medians to the reference and the per-round ratios, CPU seconds per step (user + system
of the process tree; less sensitive to load than wall), and the load average around every run.
On a busy machine the start-up of a process swings by seconds, as much as 200 steps of the tiny
model take: there, use ``--n2 1020`` (or more) so that the difference dwarfs the swing.

    PYTHONPATH=. python benchmarks/vs_reference.py --reference /tmp/ref/train_dreambooth_lora_flux.py \\
        --pairs 3 --json benchmarks/results/vs_reference.json
    PYTHONPATH=. python benchmarks/vs_reference.py --smoke    # flux_lightning only, a few steps
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, median, save_json, table

REPO = Path(__file__).resolve().parents[1]

# The diffusers script's `target_modules` when `--lora_layers` is not given.
REFERENCE_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
PROMPT = "a photo of sks shape"
REFERENCE = "reference"
TRAINERS = {  # name -> table label
    REFERENCE: "diffusers `train_dreambooth_lora_flux.py` (gradient checkpointing off)",
    "flux_lightning": "flux_lightning, same settings, `model.gradient_checkpointing=false`",
    "flux_lightning_gc": "flux_lightning, its default gradient checkpointing (on)",
}
# what the reference imports beyond torch/diffusers/transformers (datasets only with --dataset_name)
REFERENCE_PACKAGES = ["accelerate", "peft", "torchvision", "tensorboard", "huggingface_hub", "PIL", "tqdm"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def reference_command(
    script: Path,
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    *,
    resolution: int = 64,
    rank: int = 4,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
) -> list[str]:
    """The diffusers script with the benchmark's settings (everything not named is its default), run
    by this Python; ``benchmarks/memory_vs_reference.py`` changes the keyword ones."""
    cmd = [
        sys.executable,
        str(script),
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        PROMPT,
        "--output_dir",
        str(out),
        "--resolution",
        str(resolution),
        "--train_batch_size",
        "1",
        "--rank",
        str(rank),
        "--lora_alpha",
        str(rank),
        "--learning_rate",
        "1e-4",
        "--max_sequence_length",
        "512",
        "--mixed_precision",
        mixed_precision,
        "--cache_latents",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "1000000000",
        "--seed",
        "0",
    ]
    return cmd + (["--gradient_checkpointing"] if gradient_checkpointing else [])


def flux_lightning_command(
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    gradient_checkpointing: bool,
    *,
    resolution: int = 64,
    rank: int = 4,
    bf16: bool = False,
) -> list[str]:
    """``python -m flux_lightning`` with the reference's settings (``gradient_checkpointing``: on or off;
    ``resolution``, ``rank`` (alpha = rank) and ``bf16`` weights with bf16-mixed for memory_vs_reference.py)."""
    cmd = [
        sys.executable,
        "-m",
        "flux_lightning",
        "model=dev",
        f"model.pretrained_model_name_or_path={model}",
        f"model.dtype={'bf16' if bf16 else 'fp32'}",
        "model.guidance_value=3.5",
        "dataset=local",
        f"dataset.instance_data_dir={data}",
        "dataset.caption_strategy=instanceprompt",
        f"dataset.instance_prompt={PROMPT}",
        f"dataset.resolution={resolution}",
        "dataset.batch_size=1",
        "dataset.caption_dropout_probability=0",
        "dataset.num_workers=0",
        f"adapter.target=[{','.join(REFERENCE_TARGETS)}]",
        f"adapter.rank={rank}",
        f"adapter.alpha={rank}",
        "adapter.dropout=0",
        "adapter.init=gaussian",
        "optimizer=adamw",
        "optimizer.lr=1e-4",
        "optimizer.weight_decay=1e-4",
        f"trainer.max_steps={steps}",
        f"trainer.precision={'bf16-mixed' if bf16 else '32-true'}",
        "callbacks.validation=null",
        "callbacks.clip_score=null",
        "callbacks.eval_loss=null",
        "callbacks.model_checkpoint=null",
        f"hydra.run.dir={out}",
        f"paths.cache_dir={out / 'cache'}",
        "seed=0",
    ]
    if not gradient_checkpointing:
        cmd.append("model.gradient_checkpointing=false")
    return cmd


def command(trainer: str, args, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    if trainer == REFERENCE:
        return reference_command(args.reference, model, data, out, steps)
    return flux_lightning_command(model, data, out, steps, gradient_checkpointing=trainer == "flux_lightning_gc")


def environment(threads: int, device: str) -> dict[str, str]:
    """The same environment for every process: thread counts, offline hub, this checkout first."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def check_reference(path: Path | None) -> None:
    """Fail early, in one line, when the reference script or a package it imports is missing."""
    if path is None:
        raise SystemExit(
            "--reference is required (a copy of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py); "
            "or run --smoke for flux_lightning's side only"
        )
    if not path.is_file():
        raise SystemExit(
            f"--reference {path}: no such file; get it from the diffusers repository "
            "(examples/dreambooth/train_dreambooth_lora_flux.py)"
        )
    missing = [p for p in REFERENCE_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise SystemExit(f"the reference script imports {', '.join(missing)}: pip install {' '.join(missing)}")


def schedule(trainers: list[str], pairs: int, n1: int, n2: int) -> list[list[tuple[str, int]]]:
    """The runs of each round: every trainer's short then long run; odd rounds in reverse order."""
    order = [(t, n) for t in trainers for n in (n1, n2)]
    return [order if r % 2 == 0 else order[::-1] for r in range(pairs)]


def run_once(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run one training process; its wall and CPU seconds and the load average around it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        text = log.read_text(errors="replace")
        missing = re.findall(r"No module named '([\w.]+)'", text)
        hint = f" (missing package: pip install {missing[-1].split('.')[0]})" if missing else ""
        raise SystemExit(f"exit code {rc}{hint}: {' '.join(cmd)}\n--- last lines of {log} ---\n{text[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": os.getloadavg()[0]}


def steps_done(trainer: str, out: Path, log: Path) -> int | None:
    """Optimizer steps a finished run reports (None when its output format is not recognised)."""
    if trainer == REFERENCE:  # its tqdm bar: "Steps: 100%|...| 220/220 [...]"
        found = re.findall(r"Steps: +\d+%\|[^|]*\| *(\d+)/\d+", log.read_text(errors="replace"))
        return int(found[-1]) if found else None
    try:  # flux_lightning's run summary
        return int(json.loads((out / "result.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lora_signature(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the one LoRA file a run wrote under ``folder`` (headers only)."""
    from safetensors import safe_open

    files = sorted(folder.rglob(LORA_FILE))
    if len(files) != 1:
        raise SystemExit(f"expected one {LORA_FILE} under {folder}, found {[str(f) for f in files]}")
    with safe_open(str(files[0]), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_same_adapter(signatures: dict[str, dict]) -> None:
    """Every trainer must have trained the same LoRA tensors (names and shapes); else stop."""
    names = list(signatures)
    first = signatures[names[0]]
    for name in names[1:]:
        other = signatures[name]
        if other != first:
            only_a = sorted(set(first) - set(other))[:5]
            only_b = sorted(set(other) - set(first))[:5]
            diff = sorted(k for k in set(first) & set(other) if first[k] != other[k])[:5]
            raise SystemExit(
                f"{names[0]} and {name} trained different LoRA tensors: only in {names[0]} {only_a}, "
                f"only in {name} {only_b}, other shapes {diff}; the comparison would not be fair"
            )


def per_round(short: dict, long: dict, n1: int, n2: int) -> dict:
    """Per-step, start-up and CPU-per-step figures of one round from its short and long run."""
    step = (long["wall_s"] - short["wall_s"]) / (n2 - n1)
    return {
        "s_per_step": step,
        "startup_s": short["wall_s"] - n1 * step,
        "short_wall_s": short["wall_s"],
        "long_wall_s": long["wall_s"],
        "cpu_s_per_step": (long["cpu_s"] - short["cpu_s"]) / (n2 - n1),
    }


def spread(values: list[float]) -> dict:
    return {"median": median(values), "min": min(values), "max": max(values)}


def summarise(rounds: dict[str, list[dict]], reference: str | None) -> dict:
    """Medians and min/max over the rounds; ratios to ``reference`` (of medians and per round)."""
    out = {trainer: {key: spread([r[key] for r in rows]) for key in rows[0]} for trainer, rows in rounds.items()}
    if reference in rounds:
        ref = out[reference]
        for trainer, entry in out.items():
            if trainer != reference:
                entry["ratio_of_medians"] = entry["s_per_step"]["median"] / ref["s_per_step"]["median"]
                entry["ratio_per_round"] = spread(
                    [r["s_per_step"] / q["s_per_step"] for r, q in zip(rounds[trainer], rounds[reference])]
                )
                entry["startup_ratio"] = entry["startup_s"]["median"] / ref["startup_s"]["median"]
                entry["cpu_ratio_of_medians"] = entry["cpu_s_per_step"]["median"] / ref["cpu_s_per_step"]["median"]
    return out


def markdown(summary: dict, n1: int) -> str:
    """The README table: trainer | s/step | ratio to reference | start-up | N1-step process wall."""

    def cell(s: dict, digits: int) -> str:
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    def ratio(trainer: str, e: dict, key: str) -> str:
        return f"{e[key]:.2f}x" if key in e else "1.00x" if trainer == REFERENCE else "-"

    rows = []
    for trainer, e in summary.items():
        rows.append(
            [
                TRAINERS[trainer],
                cell(e["s_per_step"], 3),
                ratio(trainer, e, "ratio_of_medians"),
                cell(e["startup_s"], 1),
                cell(e["short_wall_s"], 1),
                f"{cell(e['cpu_s_per_step'], 3)}, {ratio(trainer, e, 'cpu_ratio_of_medians')}",
            ]
        )
    header = [
        "trainer",
        "s/step (min-max)",
        "ratio to reference",
        "start-up s",
        f"{n1}-step process wall s",
        "CPU s/step, ratio",
    ]
    return table(header, rows)


def provenance(reference: Path | None) -> dict:
    """What the numbers belong to: this checkout's commit, the reference file's hash, package versions."""
    from importlib.metadata import PackageNotFoundError, version

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "lightning"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "commit": git("rev-parse", "HEAD"),
        # changes to what runs (the library, its config tree, this script) since that commit
        "uncommitted_changes": bool(git("status", "--porcelain", "--", "flux_lightning", "conf", "benchmarks/*.py")),
        "reference_sha256": hashlib.sha256(reference.read_bytes()).hexdigest() if reference else None,
        "versions": versions,
    }


def prepare_inputs(work: Path, images: int) -> tuple[Path, Path]:
    """The tiny Flux folder and the image folder both trainers read (built once under ``work``)."""
    from flux_lightning.data.demo import make_demo_dataset
    from flux_lightning.model.tiny import ensure_tiny_folder

    return ensure_tiny_folder(work / "models"), make_demo_dataset(work / "data", count=images, size=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, help="path to diffusers' train_dreambooth_lora_flux.py")
    p.add_argument("--pairs", type=int, default=3, help="rounds of (short, long) runs per trainer")
    p.add_argument("--n1", type=int, default=20, help="steps of the short run")
    p.add_argument("--n2", type=int, default=220, help="steps of the long run")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every process")
    p.add_argument("--images", type=int, default=8, help="generated 64 px training images")
    p.add_argument("--trainers", nargs="+", choices=list(TRAINERS), help="default: all (--smoke: flux_lightning's)")
    p.add_argument("--device", choices=["cpu", "auto"], default="cpu", help="cpu hides the GPUs from both")
    p.add_argument("--work", type=Path, help="working folder (inputs, logs, run dirs); default: a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the run dirs (default: only the logs)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="flux_lightning only, --n1 1 --n2 3 --pairs 1 --images 2")
    args = p.parse_args(argv)
    if args.smoke:
        args.n1, args.n2, args.pairs, args.images = 1, 3, 1, 2
        args.trainers = args.trainers or ["flux_lightning", "flux_lightning_gc"]
    args.trainers = args.trainers or list(TRAINERS)
    if not 0 < args.n1 < args.n2:
        p.error(f"need 0 < --n1 < --n2, got {args.n1} and {args.n2}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if REFERENCE in args.trainers:
        check_reference(args.reference)
    work = args.work or Path(tempfile.mkdtemp(prefix="vs_reference_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = prepare_inputs(work, args.images)
    env = environment(args.threads, args.device)
    origin = provenance(args.reference if REFERENCE in args.trainers else None)  # before anything can change
    runs: dict[tuple[str, int, int], dict] = {}
    load_start = os.getloadavg()
    for r, order in enumerate(schedule(args.trainers, args.pairs, args.n1, args.n2)):
        signatures = {}
        for trainer, steps in order:
            out = work / "runs" / f"{trainer}-{steps}-r{r}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            log = work / "logs" / f"{trainer}-{steps}-r{r}.log"
            log.parent.mkdir(exist_ok=True)
            run = runs[trainer, steps, r] = run_once(command(trainer, args, model, data, out, steps), out, env, log)
            done = run["steps_done"] = steps_done(trainer, out, log)
            if done is not None and done != steps:
                raise SystemExit(f"{trainer} ran {done} steps, not {steps} (log: {log})")
            print(
                f"round {r + 1}/{args.pairs} {trainer:18s} {steps:4d} steps: {run['wall_s']:7.1f} s "
                f"(load {run['load_before']:.1f})",
                flush=True,
            )
            if r == 0 and steps == args.n1:
                signatures[trainer] = lora_signature(out)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if signatures:
            check_same_adapter(signatures)
    rounds = {
        t: [per_round(runs[t, args.n1, r], runs[t, args.n2, r], args.n1, args.n2) for r in range(args.pairs)]
        for t in args.trainers
    }
    summary = summarise(rounds, REFERENCE)
    result = {
        "machine": machine(),
        "threads": args.threads,
        "device": args.device,
        "n1": args.n1,
        "n2": args.n2,
        "pairs": args.pairs,
        "images": args.images,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "reference": str(args.reference) if REFERENCE in args.trainers else None,
        **origin,
        "command": " ".join(sys.argv) if argv is None else " ".join(argv),
        "summary": summary,
        "rounds": rounds,
        "runs": [{"trainer": t, "steps": n, "round": r, **v} for (t, n, r), v in runs.items()],
    }
    print(
        f"\n{machine()}; {args.threads} thread(s) per trainer process; "
        f"load average {load_start[0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end"
    )
    print(markdown(summary, args.n1))
    save_json(args.json, result)
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
