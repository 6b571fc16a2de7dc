"""Start-up: what the entry point imports, the third-party lines it drops, and the timing hook
(``benchmarks/startup.py`` measures the seconds; nothing here is timed)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from flux_lightning.run import timings
from flux_lightning.run.quiet import BNB_CPU_LOGGER, silence_third_party_noise

from ..conftest import REPO

# Imported only when a run chooses them (or, for diffusers/peft and bitsandbytes, which peft imports
# whenever it is installed, when the model is loaded), never by the entry point's import.
HEAVY_OPTIONAL = (
    "wandb",
    "open_clip",
    "optimum",
    "lycoris",
    "bitsandbytes",
    "deepspeed",
    "prodigyopt",
    "optimi",
    "peft",
    "diffusers",
)


def test_importing_the_entry_point_loads_no_optional_heavy_package():
    code = (
        "import sys, json, flux_lightning.run.train\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_OPTIONAL!r} if m in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"`import flux_lightning.run.train` imports {loaded}; import them where a run chooses them"


def test_the_package_exports_its_names_lazily():
    """``import flux_lightning`` imports neither torch nor Lightning; each name of ``__all__`` imports
    its module on first use and is the class that module defines."""
    code = (
        "import sys, json, importlib, flux_lightning as f\n"
        "light = sorted(m for m in ('torch', 'lightning', 'hydra') if m in sys.modules)\n"
        "same = [n for n in f.__all__ if getattr(f, n) is getattr(importlib.import_module(f._EXPORTS[n], 'flux_lightning'), n)]\n"
        "print(json.dumps([light, same, sorted(f.__all__) == sorted(f._EXPORTS), set(f.__all__) <= set(dir(f))]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    light, same, listed, in_dir = json.loads(proc.stdout.strip().splitlines()[-1])
    assert light == [], f"`import flux_lightning` imported {light}"
    assert sorted(same) == sorted(__import__("flux_lightning").__all__) and listed and in_dir
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        __import__("flux_lightning").Nope


@pytest.fixture
def bnb_logger():
    logger = logging.getLogger(BNB_CPU_LOGGER)
    before = list(logger.filters)
    yield logger
    logger.filters[:] = before


def _shown(caplog, logger, message: str) -> bool:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        logger.warning(message)
    return any(r.getMessage() == message for r in caplog.records)


def test_bitsandbytes_cpu_kernel_warning_is_dropped_unless_the_run_uses_nf4(bnb_logger, caplog):
    advert = (
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
        "sure you already `pip install kernels` and the kernels >= 0.11.1"
    )
    silence_third_party_noise()
    assert not _shown(caplog, bnb_logger, advert)
    assert _shown(caplog, bnb_logger, "bitsandbytes: something else")  # only that line goes
    silence_third_party_noise(keep_bnb_cpu_warning=True)  # quantization=nf4_bnb: the warning concerns it
    assert _shown(caplog, bnb_logger, advert)
    silence_third_party_noise()
    silence_third_party_noise()
    assert not _shown(caplog, bnb_logger, advert) and len(bnb_logger.filters) == 1


class _Part:
    def prepare_data(self):
        return "prepared"

    def setup(self, stage=None):
        return stage

    def configure_model(self):
        return "configured"


def test_timing_hook_changes_nothing_when_off_and_records_phases_when_on(tmp_path, monkeypatch):
    part = _Part()
    monkeypatch.delenv(timings.ENV, raising=False)
    assert timings.instrument(part, part, []) == []
    assert "prepare_data" not in vars(part)  # nothing wrapped
    path = tmp_path / "t.jsonl"
    monkeypatch.setenv(timings.ENV, str(path))
    extra = timings.instrument(part, part, [])
    assert len(extra) == 1  # the first-step marker callback
    assert part.prepare_data() == "prepared" and part.setup("fit") == "fit" and part.configure_model() == "configured"
    timings.mark("point")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["phase"] for e in events] == [
        "datamodule.prepare_data",
        "datamodule.setup",
        "module.configure_model",
        "point",
    ]
    assert all(e["end"] >= e["start"] for e in events) and events[-1]["start"] == events[-1]["end"]


def test_tiny_clip_folder_lists_its_added_tokens_as_hub_clip_folders_do(tmp_path, tiny_folder):
    """Without ``added_tokens_decoder`` in tokenizer_config.json (transformers 5 saves none), every load
    parses the 3.6 MB tokenizer.json in Python (0.4 s before step 1 of the default run)."""
    from transformers import CLIPProcessor, CLIPTokenizer

    from flux_lightning.model.tiny import build_tiny_clip

    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    folder = build_tiny_clip(tmp_path / "clip", tokenizer=tokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    assert config["added_tokens_decoder"] == {
        "49406": {"content": "<|startoftext|>", **special},
        "49407": {"content": "<|endoftext|>", **special},
    }
    loaded = CLIPProcessor.from_pretrained(folder).tokenizer
    assert loaded.added_tokens_decoder == tokenizer.added_tokens_decoder
    for text in ("a red circle on a white background", "", "<|endoftext|> sks!!"):
        assert loaded(text).input_ids == tokenizer(text).input_ids
