"""``resize``: lower a LoRA's rank by the SVD of each module's update, keeping the file's layout.

Each module's update ``delta = alpha / r * up @ down`` is replaced by its best rank-``k`` approximation
(Eckart-Young: the ``k`` largest singular values), ``k = min(rank, r, out, in)`` (the update has no
more than its smaller side's singular values, and the alpha written is this ``k``). The SVD is taken through QR
factors of ``up`` and ``down^T`` (an ``r x r`` SVD instead of one of the full ``out x in`` update), in
float64. The new factors are ``up = U sqrt(S)``, ``down = sqrt(S) Vh`` at scale 1: ``.alpha`` tensors
become ``k``; a file without them (diffusers layout) loads at ``alpha = r``, so its
``lora_adapter_metadata`` (which would state the old rank) is dropped and ``lora_rank``/``lora_alpha``
say the new rank. Rows (columns) of the update that are exactly zero stay exactly zero (the untrained
parts of a fused kohya module: a reader then sees no update for them). Keys, key names and dtypes stay
as they were in the input file.

Retained energy of a module: ``sum(S[:k]**2) / sum(S**2)`` (the share of the update's squared
Frobenius norm kept); overall: the same sums over every module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.lora_checks import alpha_value, check_out, check_tensors, write_safetensors
from ..adapters.lora_files import load_tensors
from ..adapters.lora_layouts import file_layout, metadata_alphas, strip_prefix
from ..errors import LoraFileError

_DOWN = (".lora_A.weight", ".lora_down.weight")
_UP = {".lora_A.weight": ".lora_B.weight", ".lora_down.weight": ".lora_up.weight"}


@dataclass
class ResizedModule:
    """One module's result: ``rank`` before, ``kept`` after, ``kept_energy`` / ``total_energy``."""

    name: str
    rank: int
    kept: int
    kept_energy: float
    total_energy: float

    @property
    def energy(self) -> float:
        return self.kept_energy / self.total_energy if self.total_energy > 0 else 1.0


def low_rank_svd(down: torch.Tensor, up: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` (thin, float64) of ``scale * up @ down`` from QR factors of ``up`` and ``down^T``."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(scale * ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def resize_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], rank: int, path="the LoRA"
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[ResizedModule]]:
    """Resized tensors and metadata of a LoRA file's contents, and the per-module report."""
    if rank < 1:
        raise LoraFileError(f"--rank {rank}: the rank must be at least 1")
    file_layout(path, tensors)  # refuses what is not a LoRA
    check_tensors(path, tensors)  # 2-D finite factors of matching ranks, finite positive alphas
    bases = {k[: -len(s)]: s for k in tensors for s in _DOWN if k.endswith(s)}
    missing = [b + _UP[s] for b, s in bases.items() if b + _UP[s] not in tensors]
    if missing:
        raise LoraFileError(f"{path}: {missing[0]!r} is missing; the file is incomplete")
    has_alpha = {b: f"{b}.alpha" in tensors for b in bases}
    alphas = metadata_alphas(metadata, {b: tensors[b + s].shape[0] for b, s in bases.items()}, path)
    out = dict(tensors)
    report = []
    for base, suffix in sorted(bases.items()):
        down, up = tensors[base + suffix], tensors[base + _UP[suffix]]
        r = down.shape[0]
        alpha = alpha_value(path, f"{base}.alpha", tensors[f"{base}.alpha"]) if has_alpha[base] else alphas[base]
        u, s, vh = low_rank_svd(down, up, alpha / r)
        k = min(rank, r, s.numel())  # the update's rank is at most its smaller side: the alpha written is k
        root = s[:k].sqrt()
        new_up, new_down = u[:, :k] * root, root[:, None] * vh[:k]
        # rows of the update that are exactly zero (a fused module's untrained parts) stay exactly zero
        new_up[(up == 0).all(dim=1)] = 0
        new_down[:, (down == 0).all(dim=0)] = 0
        out[base + _UP[suffix]] = new_up.to(up.dtype).contiguous()
        out[base + suffix] = new_down.to(down.dtype).contiguous()
        if has_alpha[base]:
            out[f"{base}.alpha"] = torch.tensor(float(k), dtype=tensors[f"{base}.alpha"].dtype)
        energy = s.square()
        report.append(ResizedModule(strip_prefix(base), r, k, float(energy[:k].sum()), float(energy.sum())))
    meta = dict(metadata)
    meta.pop("lora_adapter_metadata", None)  # stated the old rank/alpha; files load at alpha = r now
    kept = max((m.kept for m in report), default=rank)
    for key in ("lora_rank", "lora_alpha", "ss_network_dim", "ss_network_alpha"):
        if key in meta:
            meta[key] = str(kept)
    return out, meta, report


def resize_file(lora, rank: int, out, overwrite: bool = False) -> list[ResizedModule]:
    """Write ``lora`` resized to ``rank`` as ``out`` (same layout); returns the per-module report.
    An existing ``out`` is replaced only with ``overwrite``, the input never (:func:`.checks.check_out`)."""
    check_out(out, [lora], overwrite)
    tensors, metadata = load_tensors(lora)
    resized, meta, report = resize_tensors(tensors, metadata, rank, Path(lora))
    write_safetensors(resized, out, meta, Path(lora))
    return report


def overall_energy(report: list[ResizedModule]) -> float:
    total = sum(m.total_energy for m in report)
    return sum(m.kept_energy for m in report) / total if total > 0 else 1.0


def format_report(report: list[ResizedModule]) -> str:
    """One line per module (``name  rank r -> k  energy e``) and the overall retained energy."""
    width = max((len(m.name) for m in report), default=0)
    lines = [f"{m.name:<{width}}  rank {m.rank:>3} -> {m.kept:<3}  energy {m.energy:.6f}" for m in report]
    lines.append(f"overall retained energy {overall_energy(report):.6f} over {len(report)} modules")
    return "\n".join(lines)
