"""Run a training command with a host-time probe: ``python _host_probe.py <script.py | -m module> args...``.

Used by ``host_time.py``; the command runs unchanged (``runpy``, same ``sys.argv``), the probe only
adds a global optimizer step hook (:func:`torch.optim.optimizer.register_optimizer_step_post_hook`,
which fires after every ``optimizer.step()`` of any trainer). Environment:

* ``HOST_PROBE_OUT``: JSON file written when the windows end.
* ``HOST_PROBE_SKIP`` (default 20): warm-up steps before the first window.
* ``HOST_PROBE_STEPS`` (default 50): steps per window.
* ``HOST_PROBE_CPROFILE``: also write :mod:`cProfile` stats of window 2 there (to find the host
  work: ``python -m pstats FILE``); window 2's wall then includes cProfile's overhead.

Window 1 (steps ``skip .. skip+steps``) runs under :mod:`torch.profiler` (CPU activity): its wall time
is split into *kernel time*, the time inside outermost ``aten::`` ops (an op not nested in another
``aten::`` op, on any thread), and *host time*, the rest: Python, the trainer's loop, the autograd
engine's bookkeeping, data loading, logging, i.e. what a GPU cannot hide. Also counted: outermost
and all ``aten::`` ops per step. Window 2 (the next ``steps`` steps) runs without the profiler: its
wall per step says how much the profiler itself adds.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time


def _outermost_aten(events) -> tuple[float, int, int]:
    """(microseconds inside outermost aten ops, their count, count of all aten ops)."""
    inside, outer, every = 0.0, 0, 0
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        every += 1
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            outer += 1
            inside += e.time_range.elapsed_us()
    return inside, outer, every


def install(out: str, skip: int, steps: int) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    state = {"n": 0, "marks": {}, "prof": None}

    def hook(optimizer, args, kwargs) -> None:
        state["n"] += 1
        n = state["n"]
        if n == skip:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["marks"]["profiled_start"] = time.perf_counter()
        elif n == skip + steps:
            state["marks"]["profiled_end"] = time.perf_counter()
            state["prof"].__exit__(None, None, None)
            state["events"] = state["prof"].events()
            if os.environ.get("HOST_PROBE_CPROFILE"):
                import cProfile

                state["cprofile"] = cProfile.Profile()
                state["cprofile"].enable()
            state["marks"]["plain_start"] = time.perf_counter()
        elif n == skip + 2 * steps:
            marks = state["marks"]
            if state.get("cprofile"):
                state["cprofile"].disable()
                state["cprofile"].dump_stats(os.environ["HOST_PROBE_CPROFILE"])
            plain = (time.perf_counter() - marks["plain_start"]) / steps
            wall_us = (marks["profiled_end"] - marks["profiled_start"]) * 1e6
            inside, outer, every = _outermost_aten(state["events"])
            result = {
                "steps": steps,
                "skip": skip,
                "profiled_s_per_step": wall_us / steps / 1e6,
                "kernel_s_per_step": inside / steps / 1e6,
                "host_s_per_step": (wall_us - inside) / steps / 1e6,
                "outermost_aten_ops_per_step": outer / steps,
                "aten_ops_per_step": every / steps,
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
        int(os.environ.get("HOST_PROBE_STEPS", "50")),
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
