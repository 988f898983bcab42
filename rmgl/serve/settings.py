"""The service's settings: one place for every default and limit, checked once.

The same object configures :func:`rmgl.serve.create_app` in a program and ``rmgl serve``
on the command line; with several worker processes it travels to each of them as JSON in
the environment (the token in its own variable, never on a command line).
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = ["AUTH_MODES", "SETTINGS_ENV", "TOKEN_ENV", "ServeSettings", "read_token"]

TOKEN_ENV = "RMGL_SERVE_TOKEN"
SETTINGS_ENV = "RMGL_SERVE_SETTINGS"
MILVUS_TOKEN_ENV = "RMGL_SERVE_MILVUS_TOKEN"  # workers get the Milvus credentials here
# writes: adds and deletes need the token; all: every /v1 route and /metrics need it too
AUTH_MODES = ("writes", "all")
MIN_TOKEN_LENGTH = 16
TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt"


@dataclass
class ServeSettings:
    """What ``rmgl serve`` runs: the gallery index, the model and the limits.

    ``index``: the index folder, or with ``store="milvus"`` the Milvus URI (a Milvus Lite
    file or ``http://HOST:19530``) of the ``collection``.

    ``model``: an rmgl checkpoint or an exported ``.onnx`` (``backend`` auto picks the
    runtime); it must be the model the gallery was extracted with unless
    ``allow_other_model``. ``token``: the shared secret that writes (and with ``auth="all"``
    every read) must present as ``Authorization: Bearer TOKEN``; without one the service is
    read-only. Limits: ``max_body_bytes`` per request (413), ``max_pixels`` per image
    (413, checked before decoding), ``max_images`` per request (413), ``max_k`` hits.
    ``threads``: CPU threads of torch and faiss (default: theirs, one per core).
    ``write_wait``: seconds an add or delete waits for another process writing the index
    (then 503). ``create``: make an empty flat index at ``index`` if there is none.
    ``crops`` (Milvus store): the folder that keeps uploaded images (without it a Milvus
    gallery takes no uploads); ``milvus_token``: the Milvus server's credentials.

    Examples::

        settings = ServeSettings(index="gallery.idx", model="runs/market/best.safetensors",
                                 token=read_token("token.txt"))
    """

    index: Path
    model: Path
    backend: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    token: str | None = field(default=None, repr=False)
    auth: str = "writes"
    max_body_bytes: int = 20 << 20
    max_pixels: int = 12_000_000
    max_images: int = 64
    max_k: int = 1000
    batch_size: int = 32
    threads: int | None = None
    write_wait: float = 30.0
    shutdown_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()
    allow_other_model: bool = False
    create: bool = False
    store: str = "faiss"
    collection: str | None = None
    crops: Path | None = None
    milvus_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # a faiss index folder, or (another store) its URI, kept as text: http://HOST:PORT
        self.index = Path(self.index) if self.store == "faiss" else str(self.index)
        self.model = Path(self.model)
        if self.store != "faiss" and not self.collection:
            raise ValueError(f"--store {self.store} needs --uri and --collection")
        if self.crops is not None:
            if self.store == "faiss":
                raise ValueError("--crops is for --store milvus; an index folder keeps its crops")
            self.crops = Path(self.crops)
        if self.store == "milvus" and "://" not in self.index and int(self.workers) > 1:
            raise ValueError(
                "--workers > 1 needs a Milvus server (--uri http://HOST:19530): a Milvus Lite "
                "file serves one process"
            )
        if self.store != "faiss" and self.create:
            raise ValueError(
                "--create makes an empty faiss index; build a collection with rmgl index build --store milvus"
            )
        self.cors_origins = tuple(self.cors_origins)
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        if self.auth == "all" and not self.token:
            raise ValueError(
                "--auth all needs a token (--token-file FILE or the environment variable "
                f"{TOKEN_ENV}); make one with: {TOKEN_HINT}"
            )
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"the token has {len(self.token)} characters; use at least {MIN_TOKEN_LENGTH} "
                f"random ones: {TOKEN_HINT}"
            )
        for name, low in (
            ("port", 0),
            ("workers", 1),
            ("max_body_bytes", 1024),
            ("max_pixels", 1),
            ("max_images", 1),
            ("max_k", 1),
            ("batch_size", 1),
            ("threads", 1),
        ):
            if getattr(self, name) is not None and int(getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.port > 65535:
            raise ValueError(f"port must be <= 65535, got {self.port}")
        if self.write_wait < 0 or self.shutdown_timeout < 0:
            raise ValueError("write_wait and shutdown_timeout must be >= 0 seconds")
        for origin in self.cors_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise ValueError(
                    f"CORS origin {origin!r} must be one exact origin such as "
                    "https://vms.example.org (no wildcard)"
                )

    @property
    def loopback(self) -> bool:
        """True when only this machine can connect (127.0.0.0/8, ::1, localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def writable(self) -> bool:
        return self.token is not None

    def to_env(self) -> dict[str, str]:
        """Environment variables that carry these settings to worker processes."""
        secrets = ("token", "milvus_token")
        values = {key: value for key, value in asdict(self).items() if key not in secrets}
        values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        env = {SETTINGS_ENV: json.dumps(values)}
        if self.token is not None:
            env[TOKEN_ENV] = self.token
        if self.milvus_token is not None:
            env[MILVUS_TOKEN_ENV] = self.milvus_token
        return env

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServeSettings:
        environ = os.environ if environ is None else environ
        if SETTINGS_ENV not in environ:
            raise ValueError(f"{SETTINGS_ENV} is not set (rmgl serve sets it for its workers)")
        values = json.loads(environ[SETTINGS_ENV])
        known = {f.name for f in fields(cls)}
        return cls(
            **{k: v for k, v in values.items() if k in known},
            token=environ.get(TOKEN_ENV) or None,
            milvus_token=environ.get(MILVUS_TOKEN_ENV) or None,
        )


def read_token(path: str | os.PathLike | None, environ: dict[str, str] | None = None) -> str | None:
    """The token: the first line of ``path`` (a file only its owner can read is advised), or
    else the ``RMGL_SERVE_TOKEN`` environment variable, or None (a read-only service)."""
    environ = os.environ if environ is None else environ
    if path is None:
        return environ.get(TOKEN_ENV) or None
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"token file {path} does not exist; make one with: {TOKEN_HINT}") from None
    except UnicodeDecodeError:
        raise ValueError(f"token file {path} is not text") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ValueError(f"token file {path} is empty; make one with: {TOKEN_HINT}")
    return token


def token_file_is_private(path: str | os.PathLike) -> bool:
    """False when group or others may read the token file."""
    return not (os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))
