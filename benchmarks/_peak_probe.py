"""Run a trainer (``-m module`` or a script) and report the RSS high-water mark of its training steps.

    python benchmarks/_peak_probe.py OUT.json STEPS -m flux_lightning <overrides...>
    python benchmarks/_peak_probe.py OUT.json STEPS /path/to/train_dreambooth_lora_flux.py <args...>

Nothing in either trainer is changed: a global forward pre-hook watches the calls of the Flux
transformer with gradients on (one per training step, whichever trainer makes it). At the first
one it records the RSS (weights loaded, caches built) and resets the kernel's high-water mark
(``/proc/self/clear_refs`` 5); the weights are paged in first (``from_pretrained`` maps safetensors files lazily, and the
first step would otherwise count their first touch). At call ``STEPS + 1`` (the next step's forward, so ``STEPS`` whole
steps with their optimizer updates have run) it writes the high-water mark and exits. The
process's high-water mark before the reset (loading) is reported too. Linux only.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import sys
import time


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    text = open("/proc/self/status").read()
    return {k: int(v) * 1024 for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", text)}


def main() -> None:
    out, steps, *rest = sys.argv[1:]
    steps = int(steps)
    import torch

    state = {"calls": 0, "t0": None}

    def hook(module, args):
        if type(module).__name__ != "FluxTransformer2DModel" or not torch.is_grad_enabled():
            return None
        state["calls"] += 1
        if state["calls"] == 1:
            # page in every weight first (from_pretrained maps safetensors files lazily), so the
            # step's figure is the step's own memory, not the weights' first touch
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    if t.device.type == "cpu" and t.numel():
                        t.detach().reshape(-1)[::512].float().sum()
            state["weights_bytes"] = sum(
                t.numel() * t.element_size() for t in module.parameters() if not t.requires_grad
            )
            before = _status()
            state["load_hwm"], state["rss_before_steps"] = before["VmHWM"], before["VmRSS"]
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            state["t0"] = time.perf_counter()
        elif state["calls"] == steps + 1:
            now = _status()
            result = {
                "steps": steps,
                "step_peak_bytes": now["VmHWM"],
                "rss_before_steps_bytes": state["rss_before_steps"],
                "load_peak_bytes": state["load_hwm"],
                "frozen_weights_bytes": state["weights_bytes"],
                "seconds_per_step": (time.perf_counter() - state["t0"]) / steps,
            }
            with open(out, "w") as f:
                json.dump(result, f)
            sys.stdout.flush()
            os._exit(0)
        return None

    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
        runpy.run_path(rest[0], run_name="__main__")
    raise SystemExit(f"the trainer ended before {steps + 1} training forwards ({state['calls']} seen)")


if __name__ == "__main__":
    main()
