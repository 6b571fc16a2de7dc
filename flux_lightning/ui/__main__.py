"""``python -m flux_lightning.ui [--host 127.0.0.1] [--port 8001] [--token T] [--workdir .]
[--data-root DIR ...]``: serve the web UI (needs the ``ui`` extra: ``pip install "flux-lightning[ui]"``).

On loopback no token is needed unless one is given; beyond loopback one is required on every
request: ``--token``, else ``$FLUX_LIGHTNING_UI_TOKEN``, else a random one printed in the URL.
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
    parser.add_argument("--token", default=None, help="token every request must carry (default: $FLUX_LIGHTNING_UI_TOKEN; "
                                                       "generated when binding beyond loopback)")
    parser.add_argument("--workdir", default=".", help="where runs live (outputs/runs/<name>, as the CLI writes them)")
    parser.add_argument("--data-root", action="append", default=[], metavar="DIR",
                        help="another folder the dataset check may read (the workdir always is); repeatable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn

        from .server import TOKEN_ENV, create_app, is_loopback
    except ImportError as err:
        sys.exit(f"error: the web UI needs the ui extra ({err.name} is missing): pip install \"flux-lightning[ui]\"")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(args.host):
        token = secrets.token_urlsafe(24)
    workdir = Path(args.workdir).resolve()
    app = create_app(workdir, token=token, data_roots=[Path(p) for p in args.data_root], host=args.host)
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"flux_lightning UI for runs under {workdir}: {url}", flush=True)
    if token and not is_loopback(args.host):
        print("every request needs the token (it is in the URL above; or 'Authorization: Bearer <token>')", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
