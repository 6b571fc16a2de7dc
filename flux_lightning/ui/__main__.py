"""python -m flux_lightning.ui: serve the web UI (needs the ui extra: pip install "flux-lightning[ui]").

Serve the web UI for the runs under --workdir. Every request needs a token: from --token-file, else
$FLUX_LIGHTNING_UI_TOKEN, else a new random one; it is printed in the URL to open (the page keeps it
in a cookie). --no-token serves a single-user machine without one, on loopback only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flux_lightning.ui", description=__doc__.split("\n\n")[1])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="a file holding the token (first line); default $FLUX_LIGHTNING_UI_TOKEN, else a random one",
    )
    parser.add_argument(
        "--no-token", action="store_true", help="serve without a token (a single-user machine; loopback only)"
    )
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)  # deprecated: every local user sees it in ps
    parser.add_argument("--workdir", default=".", help="where runs live (outputs/runs/<name>, as the CLI writes them)")
    parser.add_argument(
        "--data-root",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder the dataset check may read (the workdir always is); repeatable",
    )
    parser.add_argument(
        "--config-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="an experiment dir (DIR/experiment/<name>.yaml, as the wizard writes it) to offer and run; "
        "repeatable; <workdir>/flux_lightning_configs always is",
    )
    parser.add_argument(
        "--allow-code-overrides",
        action="store_true",
        help="let requests carry overrides that name code (_target_, hydra.*); anyone with the token "
        "can then run any function as you",
    )
    parser.add_argument(
        "--max-cpu-runs",
        type=int,
        default=1,
        metavar="N",
        help="CPU runs at once; later ones wait in the queue (default 1)",
    )
    return parser.parse_args(argv)


def read_token(args: argparse.Namespace) -> str | None:
    """The token: --token-file, else the environment, else (unless --no-token) a new random one."""
    from .server import TOKEN_ENV

    if args.no_token:
        return None
    if args.token:
        print(
            f"warning: --token puts the token where every local user sees it (ps); use --token-file or ${TOKEN_ENV}",
            file=sys.stderr,
        )
        return args.token
    if args.token_file:
        try:
            token = Path(args.token_file).expanduser().read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError):
            sys.exit(f"error: --token-file {args.token_file}: cannot read a token from it (one line)")
        if not token:
            sys.exit(f"error: --token-file {args.token_file} is empty")
        return token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    return secrets.token_urlsafe(24)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn

        from .gate import is_loopback
        from .server import create_app
    except ImportError as err:
        sys.exit(f'error: the web UI needs the ui extra ({err.name} is missing): pip install "flux-lightning[ui]"')
    if args.no_token and not is_loopback(args.host):
        sys.exit(
            f"error: --no-token serves this machine only (loopback); drop it to bind {args.host}, where a token is required"
        )
    token = read_token(args)
    workdir = Path(args.workdir).resolve()
    app = create_app(
        workdir,
        token=token,
        no_token=token is None,
        data_roots=[Path(p) for p in args.data_root],
        config_dirs=[Path(p) for p in args.config_dir],
        allow_code=args.allow_code_overrides,
        host=args.host,
        max_cpu_runs=args.max_cpu_runs,
    )
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"flux_lightning UI for runs under {workdir}: {url}", flush=True)
    if token:
        print("every request needs the token (it is in the URL above; or 'Authorization: Bearer <token>')", flush=True)
    if args.allow_code_overrides:
        print(
            "warning: --allow-code-overrides: requests may run any function (_target_ overrides) as this user",
            flush=True,
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
