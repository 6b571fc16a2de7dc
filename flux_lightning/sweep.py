"""Hydra multirun support: each job writes ``result.json``; the sweep ends with a summary table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .resume import RESULT_FILE

log = logging.getLogger(__name__)



def write_result(output_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write a job's outcome (overrides, metric, paths) to ``<output_dir>/result.json``."""
    path = Path(output_dir) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job result under a sweep dir, best (lowest metric) first."""
    rows = [json.loads(p.read_text()) for p in Path(sweep_dir).glob(f"*/{RESULT_FILE}")]
    return sorted(rows, key=lambda r: (r.get("metric") is None, r.get("metric", 0.0)))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: job, overrides, metric name and value, steps."""
    lines = ["| job | overrides | metric | value | steps |", "|---|---|---|---|---|"]
    for r in rows:
        value = r.get("metric")
        shown = f"{value:.5f}" if isinstance(value, (int, float)) else "failed"
        lines.append(
            f"| {r.get('job', '?')} | {' '.join(r.get('overrides', []))} | {r.get('metric_name', '')} "
            f"| {shown} | {r.get('steps', '')} |"
        )
    return "\n".join(lines)


class SweepSummary(Callback):
    """At the end of a multirun, print and save ``summary.md`` of job -> final metric."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        table = format_table(rows)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
