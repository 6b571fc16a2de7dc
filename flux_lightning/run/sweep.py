"""Hydra multirun support: each job writes ``result.json``; the sweep ends with a summary table."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .resume import RESULT_FILE

log = logging.getLogger(__name__)


def write_result(output_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write a job's outcome (overrides, metric, paths) to ``<output_dir>/result.json``."""
    path = Path(output_dir) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job of a sweep dir, best (lowest metric) first. A job dir (``.hydra/`` written when it
    started) without ``result.json`` is a job that failed: ``metric`` None, ``status`` failed, last."""
    rows = []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()) if Path(sweep_dir).is_dir() else []:
        if (job / RESULT_FILE).is_file():
            rows.append(json.loads((job / RESULT_FILE).read_text()))
        elif (job / ".hydra" / "overrides.yaml").is_file():
            overrides = [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
            rows.append({"job": job.name, "overrides": overrides, "metric": None, "status": "failed"})
    return sorted(rows, key=lambda r: (not _is_number(r.get("metric")), r.get("metric") or 0.0))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: job, overrides, metric name and value (``failed`` for a failed job), steps."""
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
    """At the end of a multirun, print and save ``summary.md`` of job -> final metric, best first;
    exit 1 after it when a job failed (it is in the table as ``failed``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        table = format_table(rows)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
        failed = [r["job"] for r in rows if r.get("status") == "failed"]
        if failed:
            print(
                f"error: {len(failed)} of {len(rows)} sweep jobs failed (job {', '.join(failed)}); each one's "
                f"error is printed above, its log is {sweep_dir}/<job>/{config.hydra.job.name}.log",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
