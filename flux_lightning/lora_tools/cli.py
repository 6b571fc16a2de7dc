"""``python -m flux_lightning.lora_tools merge|resize|convert ...``: the LoRA tools' command line.

Exit codes: 0 done, 2 a user error (missing file, unknown format, a LoRA for other layers, damaged
tensors, an existing ``--out`` without ``--overwrite``, an unwritable ``--out``; one line ``error: ...``
naming the file and the fix), as ``python -m flux_lightning`` does.
"""

from __future__ import annotations

import argparse
import sys

from ..adapters.lora_layouts import LORA_FORMATS
from ..errors import USER_ERRORS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flux_lightning.lora_tools", description="LoRA tools for Flux.1 LoRA files"
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    m = verbs.add_parser("merge", help="write a diffusers folder with the LoRA fused into the transformer")
    m.add_argument("--base", required=True, help="local diffusers folder of the base model")
    m.add_argument("--lora", required=True, help="LoRA .safetensors file (diffusers, ComfyUI or kohya keys)")
    m.add_argument("--out", required=True, help="new folder to write")
    m.add_argument("--scale", type=float, default=1.0, help="strength of the LoRA (default 1.0)")
    r = verbs.add_parser("resize", help="lower the rank by SVD (prints the retained energy); same layout")
    r.add_argument("--lora", required=True)
    r.add_argument("--rank", required=True, type=int)
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the input file)")
    c = verbs.add_parser("convert", help="write the LoRA in another key layout")
    c.add_argument("--lora", required=True, help="LoRA .safetensors file (any layout), or a training run's .ckpt")
    c.add_argument("--to", required=True, choices=LORA_FORMATS)
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the input file)")
    return p


def run(args: argparse.Namespace) -> None:
    if args.verb == "merge":
        from .merge import merge

        out = merge(args.base, args.lora, args.out, args.scale)
        print(f"wrote {out}: {args.base} with {args.lora} fused at scale {args.scale}")
    elif args.verb == "resize":
        from .resize import format_report, resize_file

        report = resize_file(args.lora, args.rank, args.out, args.overwrite)
        print(format_report(report))
        print(f"wrote {args.out}")
    else:
        from .convert import convert_file

        adapter, out = convert_file(args.lora, args.to, args.out, args.overwrite)
        print(f"read {adapter.path} ({adapter.layout}, {len(adapter.modules)} modules); wrote {out} ({args.to})")


def main(argv: list[str] | None = None) -> int:
    from ..run.quiet import silence_third_party_noise

    silence_third_party_noise()  # e.g. bitsandbytes' CPU-kernel warning, logged when diffusers imports peft
    args = parser().parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return 0
