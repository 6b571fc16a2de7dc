"""The VRAM forecast (flux_lightning/model/forecast.py) against peaks measured at FLUX.1's real width.

Reads the JSON of ``memory_vs_reference.py`` (flux_lightning's cells) and compares, per cell, the
forecast for the same run (the real-width folder's config, bf16, LoRA rank 16 on the reference's
12 targets, AdamW, batch 1, the cell's resolution and gradient checkpointing) with the measured
model memory: the frozen weights' bytes + the step's RSS rise over the RSS before the first step
(weights already paged in; see ``_peak_probe.py``). The process's own memory (libraries, caches)
is not the model's and is left out on both sides. Target: within 10% in every cell.

    PYTHONPATH=. python benchmarks/forecast_check.py benchmarks/results/memory_vs_reference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import table
from vs_reference import REFERENCE_TARGETS

MIB = 1024**2


def forecast_cell(folder: Path, px: int, gc: bool, rank: int):
    from flux_lightning import AdapterConfig, ModelConfig
    from flux_lightning.model.forecast import forecast

    model = ModelConfig(
        flavour="dev", pretrained_model_name_or_path=str(folder), dtype="bf16", gradient_checkpointing=gc
    )
    adapter = AdapterConfig(rank=rank, dropout=0.0, target=list(REFERENCE_TARGETS))
    return forecast(model, adapter, resolution=px, batch_size=1, optimizer="adamw")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("result", type=Path, help="memory_vs_reference.py --json output")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flux_lightning_memory_bench")
    args = p.parse_args(argv)
    from flux_lightning.model.tiny import ensure_real_width_folder

    folder = ensure_real_width_folder(args.work / "models")
    data = json.loads(args.result.read_text())
    rows, worst = [], 0.0
    for c in data["cells"]:
        if c["trainer"] != "flux_lightning":
            continue
        fc = forecast_cell(folder, c["px"], c["gradient_checkpointing"], data.get("rank", 16))
        step = c["step_peak_bytes"] - c["rss_before_steps_bytes"]
        measured = c["frozen_weights_bytes"] + step
        error = fc.total / measured - 1
        worst = max(worst, abs(error))
        rows.append(
            [
                c["px"],
                "on" if c["gradient_checkpointing"] else "off",
                f"{c['frozen_weights_bytes'] / MIB:.0f} / {fc.weights / MIB:.0f}",
                f"{step / MIB:.0f} / {(fc.adapter + fc.activations) / MIB:.0f}",
                f"{measured / MIB:.0f} / {fc.total / MIB:.0f}",
                f"{error:+.1%}",
            ]
        )
    print(
        table(
            [
                "px",
                "gradient checkpointing",
                "weights MiB measured / forecast",
                "step (adapter + activations) MiB measured / forecast",
                "model peak MiB measured / forecast",
                "error",
            ],
            rows,
        )
    )
    print(f"worst error {worst:.1%} (target <= 10%)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
