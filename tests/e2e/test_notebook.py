"""The quickstart notebook runs top to bottom with the library API."""

import nbformat
from nbclient import NotebookClient

from ..conftest import REPO


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_LIGHTNING_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "sample.png").is_file()
