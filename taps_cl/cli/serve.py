"""`taps-cl serve`: an engine's store over HTTP with MLflow's scoring server, no model logged.

The routed model (:mod:`taps_cl.serving.pyfunc`, live mode) is written to a temporary folder
and served in this process by uvicorn behind :class:`~taps_cl.serving.http.RequestGuard`. A
task committed while it serves is answered within ``--version-ttl`` seconds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from taps_cl.config import environment

__all__ = ["add_serve_parser", "cmd_serve"]


def add_serve_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers action
    from taps_cl.serving.http import DEFAULT_BODY_BYTES
    from taps_cl.serving.requests import RequestLimits

    s = sub.add_parser(
        "serve",
        help="serve the store's tasks over HTTP (MLflow scoring protocol: POST /invocations)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=5000, help="port to listen on")
    s.add_argument("--version-ttl", type=float, default=2.0,
                   help="seconds before a newly committed version is served")  # fmt: skip
    s.add_argument("--max-loaded", type=int, default=8, help="task versions kept merged")
    s.add_argument("--method", default="lda", help="routing method: lda, ncm, combined, energy")
    limits = RequestLimits()
    s.add_argument("--max-batch", type=int, default=limits.max_batch, help="images per request")
    s.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels,
                   help="width x height of one image")  # fmt: skip
    s.add_argument("--max-image-bytes", type=int, default=limits.max_image_bytes,
                   help="encoded bytes of one image")  # fmt: skip
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_BODY_BYTES,
                   help="bytes of one request body")  # fmt: skip
    s.add_argument("--store", help="SQLAlchemy URL or SQLite path (default: $TAPS_CL_STORE)")
    s.add_argument("--base", help="base model (default: $TAPS_CL_BASE or efficientnet_lite0)")
    s.add_argument("--arch", help="timm architecture of a checkpoint --base FILE")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, auto")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from taps_cl.bases import fingerprint, load_base
    from taps_cl.serving.http import build_app
    from taps_cl.serving.pyfunc import save_routed_model
    from taps_cl.serving.spec import ServedStore
    from taps_cl.storage import TaskStore, resolve_url

    base_spec = args.base or environment().base
    url = resolve_url(args.store)
    with TaskStore(url, create=False, readonly=True) as store:  # exists, and say what it holds
        fp = fingerprint(load_base(base_spec, **({"arch": args.arch} if args.arch else {})).module)
        count = len(store.list_tasks(base=fp))
        shown = store.url
    spec = ServedStore(
        base=base_spec,
        fingerprint=fp,
        store=url.render_as_string(hide_password=False),
        arch=args.arch,
        device=args.device,
        max_loaded=args.max_loaded,
        version_ttl=args.version_ttl,
        method=args.method,
        limits={
            "max_batch": args.max_batch,
            "max_image_pixels": args.max_image_pixels,
            "max_image_bytes": args.max_image_bytes,
        },
    )
    with tempfile.TemporaryDirectory(prefix="taps-cl-serve-") as tmp:
        app = build_app(save_routed_model(Path(tmp) / "model", spec), args.max_body_bytes)
        print(f"serving {count} task(s) of {shown} at http://{args.host}:{args.port}/invocations",
              flush=True)  # fmt: skip
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
