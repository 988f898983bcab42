"""``rmgl serve``: the gallery search service (HTTP API and web page) over an index folder
(see docs/serve.md). FastAPI, uvicorn and torch are imported only when it runs."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from rmgl.cli.options import BACKENDS, add_encoder_options
from rmgl.cli.search import add_store_options

INSTALL_HINT = "pip install 'rmgl[serve]'"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="a gallery search service: HTTP API and web page over an index",
        description="Serve a gallery index over HTTP: search by image, descriptor or item, "
        "embed images, add and delete items (with a token), a web page at /, the API at "
        "/docs, Prometheus metrics at /metrics. Binds 127.0.0.1 unless --host says "
        "otherwise. See docs/serve.md.",
    )
    serve.add_argument("--index", help="the index folder (rmgl index build)")
    add_store_options(serve)
    serve.add_argument(
        "--crops",
        metavar="FOLDER",
        help="--store milvus: keep uploaded images here (without it uploads are refused)",
    )
    add_encoder_options(
        serve,
        checkpoint_help="the rmgl checkpoint the gallery was extracted with",
        onnx_help="or its export (rmgl export --format onnx)",
        backend={"default": "auto", "choices": BACKENDS},
        batch_size=32,
        batch_help="images encoded at once",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default loopback: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, each with its own model (default 1; see docs/serve.md)",
    )
    serve.add_argument(
        "--token-file",
        help="file whose first line is the token that adds and deletes need (default: the "
        "environment variable RMGL_SERVE_TOKEN; with neither, the service is read-only)",
    )
    serve.add_argument(
        "--auth",
        default="writes",
        choices=("writes", "all"),
        help="what needs the token: writes (default) or all (every /v1 route and /metrics)",
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=20 << 20, help="request body limit (413)"
    )
    serve.add_argument(
        "--max-pixels", type=int, default=12_000_000, help="pixels per image (413, before decoding)"
    )
    serve.add_argument("--max-images", type=int, default=64, help="images per request (413)")
    serve.add_argument("--max-k", type=int, default=1000, help="hits per search")
    serve.add_argument(
        "--threads", type=int, help="CPU threads of the model and the search (default: all cores)"
    )
    serve.add_argument(
        "--write-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a write waits for another process writing the index (then 503)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may take to finish",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="URL",
        help="allow browser pages of this origin to call the API (CORS is off by default)",
    )
    serve.add_argument(
        "--root-path", default="", help="path prefix under a reverse proxy (e.g. /reid)"
    )
    serve.add_argument(
        "--allow-other-model",
        action="store_true",
        help="serve an index extracted with another model anyway (distances mean nothing)",
    )
    serve.add_argument(
        "--create",
        action="store_true",
        help="create an empty (flat) index at --index when there is none",
    )
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ValueError(f"{err.name} is not installed; rmgl serve needs {INSTALL_HINT}") from None
    from rmgl.cli.search import store_location
    from rmgl.serve.service import GalleryService
    from rmgl.serve.settings import ServeSettings, read_token, token_file_is_private

    token = read_token(args.token_file)
    location, options = store_location(args, args.index, "--index")
    settings = ServeSettings(
        index=location,
        store=args.store,
        collection=options.get("collection"),
        crops=args.crops,
        milvus_token=options.get("token"),
        model=args.checkpoint or args.onnx,
        backend=args.backend,
        device=args.device,
        host=args.host,
        port=args.port,
        workers=args.workers,
        token=token,
        auth=args.auth,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_k=args.max_k,
        batch_size=args.batch_size,
        threads=args.threads,
        write_wait=args.write_wait,
        shutdown_timeout=args.shutdown_timeout,
        cors_origins=tuple(args.cors_origin),
        allow_other_model=args.allow_other_model,
        create=args.create,
    )
    if args.token_file and not token_file_is_private(args.token_file):
        note(f"warning: {args.token_file} is readable by other users; chmod 600 it")
    service = GalleryService.open(settings)  # every check before the port is opened
    info = service.info()
    note(
        f"{settings.index}: {info['live']} live items ({info['kind']}, {info['dim']}-d, "
        f"generation {info['generation']}); model {settings.model} ({service.encoder.backend})"
    )
    where = f"http://{settings.host}:{settings.port}{args.root_path}"
    if settings.loopback:
        note(
            f"listening on {where}/ (loopback only: other machines cannot connect; --host to change)"
        )
    else:
        note(f"listening on {where}/ ON THE NETWORK: every machine that reaches it can connect")
    if settings.token is None:
        note("read-only: no token (--token-file or RMGL_SERVE_TOKEN), adds and deletes are refused")
    elif settings.auth == "all":
        note("every request except /, /healthz and /readyz needs the token")
    else:
        note("adds and deletes need the token; searches do not (--auth all to require it)")
    options = {
        "host": settings.host,
        "port": settings.port,
        "root_path": args.root_path,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "log_level": "info",
        "server_header": False,
    }
    if settings.workers == 1:
        from rmgl.serve.app import create_app

        # the app closes the service at shutdown, after the requests in flight
        uvicorn.run(create_app(service=service, close_service=True), **options)
        return 0
    service.close()  # each worker opens its own
    os.environ.update(settings.to_env())
    with tempfile.TemporaryDirectory(prefix="rmgl-serve-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # counters summed over workers
        uvicorn.run(
            "rmgl.serve.app:app_from_environment",
            factory=True,
            workers=settings.workers,
            **options,
        )
    note("stopped")
    return 0


def note(text: str) -> None:
    print(f"rmgl serve: {text}", file=sys.stderr, flush=True)
