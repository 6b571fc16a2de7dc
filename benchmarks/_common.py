"""Shared pieces of the CPU benchmarks: a small Flux saved as a diffusers folder, in-memory data, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

# The "small Flux" of the benchmarks: the real architecture, narrow and shallow.
SMALL_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=4,  # double-stream blocks
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=4,  # width 256
    joint_attention_dim=256,
    pooled_projection_dim=128,
    guidance_embeds=True,
    axes_dims_rope=(8, 28, 28),
)
TEXT_TOKENS = 64


def small_flux_folder(root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Save the small Flux (random weights, fixed seed) as a diffusers folder and return its path."""
    from diffusers import FluxTransformer2DModel

    root = Path(root or tempfile.mkdtemp(prefix="flux_lightning_bench_"))
    folder = root / f"small-flux-seed{seed}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        FluxTransformer2DModel(**SMALL_FLUX).save_pretrained(folder)
    return folder


def model_config(folder: Path, gradient_checkpointing: bool = True):
    """A ``ModelConfig`` that loads the small Flux through the library's own loading code."""
    from flux_lightning import ModelConfig

    return ModelConfig(
        flavour="tiny",  # facts only (guidance embedding on, guidance 1.0); the weights come from `folder`
        pretrained_transformer_model_name_or_path=str(folder),
        pretrained_transformer_subfolder="none",
        gradient_checkpointing=gradient_checkpointing,
        dtype="fp32",
    )


def batches(count: int, image_tokens: int, batch_size: int = 1, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` cached-style samples held in memory: latents ``(16, H, W)`` with ``H/2 * W/2 = image_tokens``."""
    side = int(round(image_tokens**0.5)) * 2
    assert (side // 2) ** 2 == image_tokens, "image_tokens must be a square number"
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "latents": torch.randn(16, side, side, generator=g),
            "prompt_embeds": torch.randn(TEXT_TOKENS, SMALL_FLUX["joint_attention_dim"], generator=g),
            "pooled_prompt_embeds": torch.randn(SMALL_FLUX["pooled_projection_dim"], generator=g),
        }
        for _ in range(count * batch_size)
    ]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """CPU model and the cores torch uses (the README records where numbers came from)."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} (torch threads: {torch.get_num_threads()})"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (what the README records)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(path: str | None, result: dict) -> None:
    """Write ``result`` to ``path`` (if given) as indented JSON."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
