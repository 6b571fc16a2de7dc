"""Run a training command with a host-time probe: ``python _host_probe.py <script.py | -m module> args...``.

Used by ``host_time.py``; the command runs unchanged (``runpy``, same ``sys.argv``), the probe only
adds a global optimizer step hook (:func:`torch.optim.optimizer.register_optimizer_step_post_hook`,
which fires after every ``optimizer.step()`` of any trainer). Environment:

* ``HOST_PROBE_OUT``: JSON file written when the windows end.
* ``HOST_PROBE_SKIP`` (default 20): warm-up steps before the first window.
* ``HOST_PROBE_STEPS`` (default 10): steps per window.
* ``HOST_PROBE_WINDOWS`` (default 5): profiled windows, one after the other (one profiler session,
  split at marks the hook records).
* ``HOST_PROBE_CPROFILE``: also write :mod:`cProfile` stats of window 2 there (to find the host
  work: ``python -m pstats FILE``); window 2's wall then includes cProfile's overhead.

Each profiled window (``HOST_PROBE_WINDOWS`` of ``HOST_PROBE_STEPS`` steps after ``HOST_PROBE_SKIP``)
runs under :mod:`torch.profiler` (CPU activity): its wall time is split into *kernel time*, the time inside outermost ``aten::`` ops (an op not nested in another
``aten::`` op, on any thread), and *host time*, the rest: Python, the trainer's loop, the autograd
engine's bookkeeping, data loading, logging, i.e. what a GPU cannot hide. Also counted: outermost
and all ``aten::`` ops per step. Reported: the window with the median host time (a preemption by
another job lands in one window, not in all), the minimum over windows, and a last window of
``HOST_PROBE_STEPS`` steps without the profiler (how much the profiler itself adds).
"""

from __future__ import annotations

import bisect
import json
import os
import runpy
import sys
import time

MARK = "host_probe_window_boundary"


def _windows(events) -> list[dict]:
    """Split one profiler session at the boundary marks: per window, wall (between marks, in the
    profiler's clock), time inside outermost aten ops (an op not nested in another aten op), their
    count and the count of all aten ops, per step."""
    marks = sorted(e.time_range.start for e in events if e.name == MARK)
    spans = list(zip(marks, marks[1:]))
    inside = [0.0] * len(spans)
    outer = [0] * len(spans)
    every = [0] * len(spans)
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        i = bisect.bisect_right(marks, e.time_range.start) - 1
        if not 0 <= i < len(spans):
            continue
        every[i] += 1
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            outer[i] += 1
            inside[i] += e.time_range.elapsed_us()
    return [
        {"wall_us": b - a, "inside_us": inside[i], "outer": outer[i], "every": every[i]}
        for i, (a, b) in enumerate(spans)
    ]


def install(out: str, skip: int, steps: int, windows: int) -> None:
    import statistics

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    state: dict = {"n": 0, "prof": None}
    profiled_end = skip + windows * steps

    def mark() -> None:
        with torch.profiler.record_function(MARK):
            pass

    def hook(optimizer, args, kwargs) -> None:
        state["n"] += 1
        n = state["n"]
        if n == skip:  # one profiler session for every window (starting several in one process crashes)
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].__enter__()
        if skip <= n <= profiled_end and (n - skip) % steps == 0:
            mark()
        if n == profiled_end:
            state["prof"].__exit__(None, None, None)
            state["per"] = [
                {
                    "profiled_s_per_step": w["wall_us"] / steps / 1e6,
                    "kernel_s_per_step": w["inside_us"] / steps / 1e6,
                    "host_s_per_step": (w["wall_us"] - w["inside_us"]) / steps / 1e6,
                    "outermost_aten_ops_per_step": w["outer"] / steps,
                    "aten_ops_per_step": w["every"] / steps,
                }
                for w in _windows(state["prof"].events())
            ]
            if os.environ.get("HOST_PROBE_CPROFILE"):
                import cProfile

                state["cprofile"] = cProfile.Profile()
                state["cprofile"].enable()
            state["plain_start"] = time.perf_counter()
        elif n == profiled_end + steps:
            plain = (time.perf_counter() - state["plain_start"]) / steps
            if state.get("cprofile"):
                state["cprofile"].disable()
                state["cprofile"].dump_stats(os.environ["HOST_PROBE_CPROFILE"])
            per = state["per"]
            # the window with the median host time, whole (its numbers add up); min over windows beside it
            middle = sorted(per, key=lambda w: w["host_s_per_step"])[(len(per) - 1) // 2]
            result = {
                "steps": steps,
                "skip": skip,
                "windows": per,
                **middle,
                "host_s_per_step_min": min(w["host_s_per_step"] for w in per),
                "host_s_per_step_mean": statistics.mean(w["host_s_per_step"] for w in per),
                "plain_s_per_step": plain,
                "torch_threads": torch.get_num_threads(),
            }
            with open(out, "w") as f:
                json.dump(result, f, indent=1)

    register_optimizer_step_post_hook(hook)


def main() -> None:
    install(
        os.environ["HOST_PROBE_OUT"],
        int(os.environ.get("HOST_PROBE_SKIP", "20")),
        int(os.environ.get("HOST_PROBE_STEPS", "10")),
        int(os.environ.get("HOST_PROBE_WINDOWS", "5")),
    )
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        import importlib.util

        module = args[1]
        spec = importlib.util.find_spec(module + ".__main__") or importlib.util.find_spec(module)
        sys.argv = [spec.origin, *args[2:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
