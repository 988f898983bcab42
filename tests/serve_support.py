"""A tiny model, a gallery index and running servers for the rmgl serve tests.

The setup (synthetic Market-like crops, an untrained ResNet-18 RMGL at 48x16, the gallery's
feature folder written by ``rmgl extract`` and its flat index) is built once per test session
and kept in the session's temporary folder; every test module copies the index it changes.
Servers are real ``rmgl serve`` processes on a free loopback port.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"


@dataclass
class ServeData:
    root: Path
    checkpoint: Path
    gallery_images: list[Path]  # in the index, ids in this order
    query_images: list[Path]
    features: Path  # the gallery's feature folder (rmgl extract)
    index: Path  # the gallery index built from it (flat); copy it before changing it

    def copy_index(self, where: Path) -> Path:
        shutil.copytree(self.index, where)
        return where


def serve_data(tmp_path_factory) -> ServeData:
    """Built on the first call of a session, then reused (about 10 s on 2 busy cores)."""
    root = tmp_path_factory.getbasetemp() / "serve-data"
    done = root / "done"
    if not done.exists():
        from deploy_support import make_checkpoint, make_synthetic

        from rmgl.cli import main

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        data = make_synthetic(root / "data")
        checkpoint = make_checkpoint(root / "model.safetensors", data)
        argv = ["extract", "--checkpoint", str(checkpoint), "--images"]
        common = ["--device", "cpu", "--workers", "0"]
        assert (
            main([*argv, str(data / "bounding_box_test"), "--out", str(root / "g"), *common]) == 0
        )
        assert (
            main(["index", "build", "--features", str(root / "g"), "--out", str(root / "g.idx")])
            == 0
        )
        done.write_text("ok")
    data = root / "data"
    return ServeData(
        root,
        root / "model.safetensors",
        sorted((data / "bounding_box_test").glob("*.jpg")),
        sorted((data / "query").glob("*.jpg")),
        root / "g",
        root / "g.idx",
    )


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def noise_png(seed: int, size: tuple[int, int] = (16, 40)) -> bytes:
    """A distinct small image (random pixels): a new gallery crop for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but whose pixel data is a few bytes
    (what a decompression bomb looks like before it is decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``rmgl serve`` in a subprocess on a free loopback port; its log in ``log``."""

    def __init__(self, index: Path, checkpoint: Path, token_file: Path | None, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = index.parent / f"server-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "rmgl.cli",
            "serve",
            "--index",
            str(index),
            "--checkpoint",
            str(checkpoint),
            "--device",
            "cpu",
            "--port",
            str(self.port),
            *(["--token-file", str(token_file)] if token_file else []),
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop("RMGL_SERVE_TOKEN", None)
        self._log_file = open(self.log, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=index.parent
        )

    def wait_ready(self, timeout: float = 300.0) -> Server:
        """Until /readyz answers 200; a server that exits or never gets ready is stopped
        (a busy machine makes start-up slow: the model and torch load in each process)."""
        import httpx2

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.text()}")
            try:
                if httpx2.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx2.HTTPError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"the server was not ready after {timeout} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode
