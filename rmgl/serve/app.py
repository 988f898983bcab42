"""The HTTP API and the web page of the gallery search service (FastAPI).

Every route answers JSON; every refusal is a 4xx with one line, ``{"error": "...",
"status": N}``; an unexpected failure is a 500 that names a reference and nothing else
(the traceback goes to the server's log). Limits are enforced before work: the body size
as it arrives (413), the number of images and their pixels before any decoding (413), the
format of every upload (415), the token of every write (401, compared in constant time).

Examples::

    from rmgl.serve import ServeSettings, create_app

    app = create_app(ServeSettings(index="gallery.idx", model="best.safetensors"))
    # run it with any ASGI server: uvicorn.run(app, host="127.0.0.1", port=8000)
"""

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from rmgl.metrics.distance import METRICS
from rmgl.serve.errors import RequestError
from rmgl.serve.images import DecodedImage, decode_image
from rmgl.serve.metrics import CONTENT_TYPE, ServiceMetrics
from rmgl.serve.service import GalleryService, parse_time
from rmgl.serve.settings import ServeSettings

__all__ = ["app_from_environment", "create_app"]

log = logging.getLogger("rmgl.serve")

MAX_ITEM_ID = 2**62
# form fields other than files: small values (a camera, a time, a source label)
MAX_FIELD_BYTES = 64 << 10
MAX_FIELDS = 1000
JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"


# ---- request bodies


def _split_numbers(value: Any) -> Any:
    """``"1,2"`` (a form field) -> ["1", "2"]; lists and None pass."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SearchOptions(BaseModel):
    """How to search: the top ``k``, filters, the cross-camera protocol, re-ranking."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, description="number of hits")
    cameras: list[int] | None = Field(None, description="only these cameras (camid)")
    start: float | str | None = Field(
        None, description="only items at or after this frame or time (number or ISO 8601)"
    )
    end: float | str | None = Field(None, description="only items at or before this frame or time")
    exclude_same_camera: bool = Field(
        False, description="drop items with the query's pid and camera (needs pid and camera)"
    )
    pid: int | None = Field(None, description="the query's identity, if known")
    camera: int | None = Field(None, description="the query's camera, if known")
    rerank: bool = Field(False, description="k-reciprocal re-ranking of the shortlist")
    rerank_shortlist: int = Field(100, ge=1)
    metric: Literal[METRICS] = "euclidean"  # type: ignore[valid-type]

    _cameras = field_validator("cameras", mode="before")(_split_numbers)


class SearchBody(SearchOptions):
    """A JSON search: a descriptor, or a gallery item to search from."""

    descriptor: list[float] | None = Field(None, description="a descriptor (normalised here)")
    descriptor_b64: str | None = Field(
        None,
        description="the same as base64 of little-endian float32 (numpy's tobytes()): "
        "smaller and faster to encode than a list of numbers",
    )
    item: int | None = Field(None, ge=0, lt=MAX_ITEM_ID, description="search from this item")


class DeleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] | None = None
    before: float | str | None = None

    _ids = field_validator("ids", mode="before")(_split_numbers)


def _one_line(errors: list[dict]) -> str:
    """The first validation error as ``field: what was wrong`` (and how many more)."""
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown field (see /docs for the fields this route takes)"
    elif first.get("type") == "missing":
        message = "is required"
    shown = first.get("input")
    if (
        first.get("type") != "missing"
        and isinstance(shown, (int, float, str))
        and len(str(shown)) < 40
    ):
        message += f" (got {shown!r})"
    more = f" ({len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def _validate(model: type[BaseModel], values: Any) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise RequestError(400, _one_line(err.errors())) from None


def _frames(options: SearchOptions) -> tuple[float | None, float | None] | None:
    if options.start is None and options.end is None:
        return None
    start = None if options.start is None else parse_time(options.start, "start")
    end = None if options.end is None else parse_time(options.end, "end")
    if start is not None and end is not None and start > end:
        raise RequestError(400, f"start {_shown(options.start)} is after end {_shown(options.end)}")
    return start, end


def _shown(value: float | str) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown_name(upload: UploadFile, position: int) -> tuple[str, str]:
    """How messages name an upload (its position and file name) and the file name, made
    printable and short: a label, never a path."""
    name = re.sub(r"[^\w .@+-]", "_", upload.filename or "")[:80]
    return (f"image {position} ({name})" if name else f"image {position}"), name


# ---- the page


def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: only its own inline script and style (by
    hash), images from this server or the browser's memory, requests to this server."""
    html = resources.files("rmgl.serve").joinpath("page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
            for body in found
        )

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, policy


# ---- middleware: limits, metrics, headers


class BodyTooLarge(HTTPException):
    """Raised while the body arrives, as soon as it passes the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than the limit of {limit:,} bytes (--max-body-bytes)"
        )


class GuardMiddleware:
    """Pure ASGI: refuses a body over the limit (by its Content-Length at once, or while
    it streams in), times and counts every request by its route's template, and adds the
    headers every response carries."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"cache-control", b"no-store"),
    ]

    def __init__(self, app, max_body: int, metrics: ServiceMetrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        declared = dict(scope["headers"]).get(b"content-length")
        limit = self.max_body

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in self.HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                error = BodyTooLarge(limit) if declared.isdigit() else None
                message = error.detail if error else "Content-Length is not a number"
                response = JSONResponse(
                    {"error": message, "status": 413 if error else 400},
                    status_code=413 if error else 400,
                    headers={"connection": "close"},
                )
                await response(scope, receive, send_with_headers)
                return
            await self.app(scope, counted_receive, send_with_headers)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(
                endpoint, scope["method"], status[0], time.perf_counter() - started
            )


# ---- the app


def create_app(
    settings: ServeSettings | None = None,
    service: GalleryService | None = None,
    close_service: bool | None = None,
) -> FastAPI:
    """The FastAPI app. Without ``service`` it opens one from ``settings`` at start-up;
    with one (already open: a program's, or ``rmgl serve``'s) it serves that. At shutdown,
    after the requests in flight, the service is closed (pending adds committed, the index
    closed) if the app opened it or ``close_service`` says so."""
    if settings is None and service is None:
        raise ValueError("create_app needs settings or an open service")
    settings = settings if settings is not None else service.settings
    holder: dict[str, GalleryService | None] = {"service": service}
    close_at_end = service is None if close_service is None else close_service

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if holder["service"] is None:
            holder["service"] = await run_in_threadpool(GalleryService.open, settings)
        try:
            yield
        finally:
            current = holder["service"]
            current.ready = False
            if close_at_end:
                await run_in_threadpool(current.close)  # pending adds are committed first
                log.info("stopped; the gallery index %s is closed", settings.index)

    def current() -> GalleryService:
        found = holder["service"]
        if found is None or not found.ready:
            raise RequestError(503, "the service is starting or stopping; try again shortly")
        return found

    app = FastAPI(
        title="rmgl gallery search",
        summary="Person re-identification search over a gallery of camera crops",
        version=_version(),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    metrics = ServiceMetrics(lambda: current().info())
    page, page_policy = _page()
    bearer = HTTPBearer(auto_error=False, description="the token of rmgl serve --token-file")

    def check_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
        client = request.client.host if request.client else "?"
        what = f"{request.method} {request.url.path} from {client}"
        if credentials is None:
            log.warning("refused %s: no token", what)
            raise RequestError(
                401,
                "this request needs the server's token: send Authorization: Bearer TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
        given = credentials.credentials.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, settings.token.encode("utf-8")):
            log.warning("refused %s: wrong token", what)  # the token itself is never logged
            raise RequestError(401, "wrong token", {"WWW-Authenticate": "Bearer"})

    Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

    def read_access(request: Request, credentials: Credentials) -> None:
        if settings.auth == "all":
            check_token(request, credentials)

    def write_access(request: Request, credentials: Credentials) -> None:
        if settings.token is None:
            raise RequestError(
                403,
                "this server is read-only: it was started without a token (--token-file or "
                "RMGL_SERVE_TOKEN), so it adds and deletes nothing",
            )
        check_token(request, credentials)

    Reader = Annotated[None, Depends(read_access)]
    Writer = Annotated[None, Depends(write_access)]
    ItemId = Annotated[int, Path(ge=0, lt=MAX_ITEM_ID)]

    # ---- errors: one line of JSON each, never a traceback

    def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message, err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = str(err.detail)
        if err.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; the API is listed at /docs"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return error_response(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(400, _one_line(list(err.errors())))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        reference = secrets.token_hex(4)
        log.error(
            "internal error %s in %s %s", reference, request.method, request.url.path, exc_info=err
        )
        return error_response(
            500, f"internal error (reference {reference}); the server's log has the details"
        )

    app.add_middleware(GuardMiddleware, max_body=settings.max_body_bytes, metrics=metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    # ---- helpers of the routes

    async def read_form(request: Request):
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(MULTIPART):
            raise RequestError(
                415, f"send {MULTIPART} with the images as files (curl -F images=@crop.jpg)"
            )
        try:
            return await request.form(
                max_files=settings.max_images + 1,
                max_fields=MAX_FIELDS,
                max_part_size=MAX_FIELD_BYTES,
            )
        except BodyTooLarge:
            raise
        except HTTPException as err:  # starlette reports a malformed form this way
            if "Too many files" in str(err.detail):
                raise RequestError(
                    413,
                    f"more than {settings.max_images} images in one request (--max-images)",
                ) from None
            raise RequestError(400, f"the multipart form could not be read: {err.detail}") from None
        except Exception as err:  # noqa: BLE001 - the parser's errors for broken bodies
            raise RequestError(400, f"the multipart form could not be read ({err})") from None

    async def decoded_files(form, field: str = "images") -> list[DecodedImage]:
        uploads = form.getlist(field)
        if any(not isinstance(upload, UploadFile) for upload in uploads):
            raise RequestError(400, f"{field} must be files (curl -F {field}=@crop.jpg)")
        if not uploads:
            raise RequestError(400, f"no image in the request (multipart file field {field})")
        if len(uploads) > settings.max_images:
            raise RequestError(
                413,
                f"{len(uploads)} images in one request; the limit is {settings.max_images} "
                "(--max-images): send them in several requests",
            )
        images = []
        for position, upload in enumerate(uploads):
            data = await upload.read()
            name, filename = _shown_name(upload, position)
            images.append(
                await run_in_threadpool(decode_image, data, name, settings.max_pixels, filename)
            )
        return images

    def fields(form, allowed: set[str], files: str = "images") -> dict[str, list[str]]:
        values: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                continue
            if key == files:
                raise RequestError(400, f"{files} must be files (curl -F {files}=@crop.jpg)")
            if key not in allowed:
                raise RequestError(400, f"{key}: unknown field (see /docs for this route's fields)")
            values.setdefault(key, []).append(value)
        return values

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON ({err})") from None

    def with_urls(request: Request, hits: list[dict]) -> list[dict]:
        root = request.scope.get("root_path", "")
        return [{**hit, "image_url": f"{root}/v1/gallery/{hit['id']}/image"} for hit in hits]

    # ---- routes

    @app.get("/", include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(
            page, headers={"content-security-policy": page_policy, "x-frame-options": "DENY"}
        )

    @app.get("/healthz", tags=["service"], summary="The process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["service"],
        summary="Index open, model loaded and warmed up (503 while starting or stopping)",
    )
    async def readyz() -> JSONResponse:
        found = holder["service"]
        if found is None or not found.ready:
            return error_response(503, "not ready: starting or stopping")
        return JSONResponse({"ready": True, "generation": found.index.generation})

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (text format)")
    async def metrics_route(_: Reader) -> Response:
        body = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/gallery", tags=["gallery"], summary="What the gallery holds")
    async def gallery_info(_: Reader) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(current().info))

    @app.post(
        "/v1/embed",
        tags=["search"],
        summary="Descriptors of one or more images (multipart field images)",
        openapi_extra=_multipart_doc({"images": "the images (JPEG, PNG, WebP, BMP)"}, True),
    )
    async def embed(
        request: Request, _: Reader, encoding: Literal["json", "base64"] = "json"
    ) -> JSONResponse:
        service = current()
        form = await read_form(request)
        fields(form, set())
        images = await decoded_files(form)
        features = await run_in_threadpool(service.embed, images)
        metrics.images.labels("encoded").inc(len(images))
        if encoding == "base64":  # little-endian float32 rows: np.frombuffer(b64decode(s), "<f4")
            descriptors = [
                base64.b64encode(row.astype("<f4").tobytes()).decode() for row in features
            ]
        else:
            descriptors = features.tolist()
        return JSONResponse(
            {
                "model": {k: v for k, v in service.model.items() if k != "model"},
                "dim": int(features.shape[1]),
                "count": len(images),
                "encoding": encoding,
                "descriptors": descriptors,
            }
        )

    @app.post(
        "/v1/search",
        tags=["search"],
        summary="The nearest gallery items of an image, a descriptor or a gallery item",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": SearchBody.model_json_schema()},
                    MULTIPART: _multipart_doc(
                        {"image": "the query image", **_option_fields()}, False
                    )["requestBody"]["content"][MULTIPART],
                },
            }
        },
    )
    async def search_route(request: Request, _: Reader) -> JSONResponse:
        service = current()
        content_type = request.headers.get("content-type", "")
        descriptor, item = None, None
        if content_type.startswith(JSON_TYPES):
            body = _validate(SearchBody, await json_body(request))
            options: SearchOptions = body
            given = [v for v in (body.descriptor, body.descriptor_b64, body.item) if v is not None]
            if len(given) > 1:
                raise RequestError(
                    400, "give one query: a descriptor, descriptor_b64 or an item, not two"
                )
            descriptor, item = body.descriptor, body.item
            if body.descriptor_b64 is not None:
                descriptor = _from_base64(body.descriptor_b64)
        elif content_type.startswith(MULTIPART):
            form = await read_form(request)
            values = fields(form, set(SearchOptions.model_fields), "image")
            single = {
                key: value[-1] if key != "cameras" else ",".join(value)
                for key, value in values.items()
            }
            options = _validate(SearchOptions, single)
            images = await decoded_files(form, "image")
            if len(images) != 1:
                raise RequestError(400, f"one query image per search, got {len(images)}")
            descriptor = (await run_in_threadpool(service.embed, images))[0]
            metrics.images.labels("encoded").inc()
        else:
            raise RequestError(
                415,
                "send application/json (a descriptor or an item) or multipart/form-data (an image)",
            )
        if options.k > settings.max_k or (
            options.rerank and options.rerank_shortlist > settings.max_k
        ):
            raise RequestError(
                400,
                f"k = {options.k} (rerank_shortlist {options.rerank_shortlist}) is more than the "
                f"limit of {settings.max_k} (--max-k)",
            )
        result = await run_in_threadpool(
            lambda: service.search(
                descriptor,
                item=item,
                k=options.k,
                cameras=options.cameras,
                frames=_frames(options),
                exclude_same_camera=options.exclude_same_camera,
                pid=options.pid,
                camera=options.camera,
                rerank=options.rerank,
                rerank_shortlist=options.rerank_shortlist,
                metric=options.metric,
            )
        )
        result["hits"] = with_urls(request, result["hits"])
        return JSONResponse(result)

    @app.post(
        "/v1/gallery",
        tags=["gallery"],
        summary="Add images to the gallery (needs the token)",
        openapi_extra=_multipart_doc(
            {
                "images": "the images",
                "camera": "camera id: one value for all images, or one per image",
                "timestamp": "frame number or time (number or ISO 8601; default: now), "
                "one or one per image",
                "pid": "identity, if known (one or one per image)",
                "source": "a label kept with the item (at most 200 characters)",
            },
            True,
        ),
    )
    async def add_route(request: Request, _: Writer) -> JSONResponse:
        service = current()
        form = await read_form(request)
        values = fields(form, {"camera", "timestamp", "pid", "source"})
        images = await decoded_files(form)
        count = len(images)

        def per_image(name: str, convert, default=None) -> list:
            given = values.get(name, [])
            if len(given) not in (0, 1, count):
                raise RequestError(
                    400, f"{len(given)} {name} values for {count} images; give one, or one each"
                )
            given = given * count if len(given) == 1 else given or [None] * count
            return [default if value in (None, "") else convert(value, name) for value in given]

        now = round(time.time(), 3)
        added = await run_in_threadpool(
            service.add,
            images,
            per_image("camera", _integer),
            per_image("timestamp", parse_time, now),
            per_image("pid", _integer),
            [value or None for value in per_image("source", lambda v, _: v)],
        )
        metrics.images.labels("added").inc(count)
        root = request.scope.get("root_path", "")
        for entry in added["added"]:
            entry["image_url"] = root + entry["image_url"]
        return JSONResponse(added)

    @app.delete(
        "/v1/gallery",
        tags=["gallery"],
        summary="Delete items by id or by time (retention; needs the token)",
        description="Query `?ids=1,2,3` or `?before=2026-11-01T00:00:00Z`, or the same as "
        'a JSON body `{"ids": [1, 2, 3]}` / `{"before": 1761955200}`. Deleted items never '
        "come back in any result, and their stored crops are removed.",
    )
    async def delete_route(
        request: Request,
        _: Writer,
        ids: str | None = None,
        before: str | None = None,
    ) -> JSONResponse:
        service = current()
        query = {
            key: value for key, value in (("ids", ids), ("before", before)) if value is not None
        }
        body = {}
        if request.headers.get("content-type", "").startswith(JSON_TYPES):
            body = await json_body(request)
            if not isinstance(body, dict):
                raise RequestError(
                    400, 'the body must be a JSON object: {"ids": [...]} or {"before": ...}'
                )
        if query and body:
            raise RequestError(400, "give ids or before in the query or in the body, not both")
        request_values = _validate(DeleteBody, query or body)
        if (request_values.ids is None) == (request_values.before is None):
            raise RequestError(400, "give ids or before (one of them)")
        before_value = (
            None if request_values.before is None else parse_time(request_values.before, "before")
        )
        result = await run_in_threadpool(
            lambda: service.delete(ids=request_values.ids, before=before_value)
        )
        metrics.images.labels("deleted").inc(result["deleted"])
        return JSONResponse(result)

    @app.get("/v1/gallery/{item_id}", tags=["gallery"], summary="One item's metadata")
    async def item_route(item_id: ItemId, _: Reader) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(current().item, item_id))

    @app.get(
        "/v1/gallery/{item_id}/image",
        tags=["gallery"],
        summary="One item's image (by id only)",
        response_class=FileResponse,
    )
    async def image_route(item_id: ItemId, _: Reader) -> FileResponse:
        path, media = await run_in_threadpool(current().image_file, item_id)
        return FileResponse(
            path, media_type=media, headers={"cache-control": "private, max-age=60"}
        )

    return app


def app_from_environment() -> FastAPI:
    """The app of a worker process started by ``rmgl serve --workers N`` (settings from
    the environment; uvicorn calls this factory in each worker)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return create_app(ServeSettings.from_env())


def _from_base64(text: str) -> np.ndarray:
    """A descriptor sent as base64 of little-endian float32."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise RequestError(400, "descriptor_b64 is not base64") from None
    if len(raw) % 4:
        raise RequestError(
            400, f"descriptor_b64 holds {len(raw)} bytes, not a whole number of float32"
        )
    return np.frombuffer(raw, dtype="<f4")


def _integer(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {value!r}") from None


def _option_fields() -> dict[str, str]:
    return {name: field.description or name for name, field in SearchOptions.model_fields.items()}


def _multipart_doc(fields: dict[str, str], files_many: bool) -> dict:
    """The OpenAPI description of a multipart body (the routes read the form themselves,
    to enforce the limits before decoding)."""
    properties: dict[str, Any] = {}
    for name, description in fields.items():
        if name in ("images", "image"):
            file = {"type": "string", "format": "binary"}
            properties[name] = (
                {"type": "array", "items": file, "description": description}
                if files_many
                else {**file, "description": description}
            )
        else:
            properties[name] = {"type": "string", "description": description}
    return {
        "requestBody": {
            "required": True,
            "content": {MULTIPART: {"schema": {"type": "object", "properties": properties}}},
        }
    }


def _version() -> str:
    from rmgl import __version__

    return __version__
