"""rmgl serve under load, on loopback: latency of embedding and search through HTTP beside
the same calls in-process, requests per second with 1, 4 and 16 concurrent clients, no
error and no lost add, and the server's resident memory. Bounded: fixed request counts
and a fixed duration per concurrency level.

    python benchmarks/serve_load.py                          # 100k gallery, flat and pcaflat
    python benchmarks/serve_load.py --gallery 20000 --duration 10 --kinds flat   # quick

Set-up. A model with random weights (speed does not depend on them): the demo RMGL-R18 at
96x32 by default (``--model r50``: the paper's R50 at 384x128, ~2 s per crop on a 2-core
CPU), both 3,584-d. The gallery: synthetic re-ID-like descriptors (``benchmarks/search.py``'s
generator), recorded as this model's, indexed as ``flat`` (exact) and ``pcaflat``
(approximate, exact re-scoring). The server is ``rmgl serve`` in its own process; the
in-process side is a :class:`rmgl.serve.service.GalleryService` on the same index folder
in this process, called exactly as the routes call it (decode + embed; search).

Latency. Each round calls the in-process service once and the server once (alternating,
so both see the same machine load); p50 / p99 over the rounds. HTTP time is what a client
sees (httpx2, a kept-alive connection): request encoding, loopback, uvicorn, FastAPI,
validation, JSON both ways. Overhead = HTTP p50 - in-process p50.

Load. For each number of clients, every client loops for ``--duration`` seconds: nine
searches by descriptor (k = 10) for one add of a new crop (a 128x64 JPEG, embedded and
committed); afterwards the gallery must hold exactly the crops whose add returned 200,
each under the id it returned, and each must be found by a search from its id.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import DIM, Generator, write_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "benchmark-token-0123456789"
MODELS = {"demo": ("resnet18", 96, 32), "r50": ("resnet50", 384, 128)}


# ---- set-up


def make_checkpoint(path: Path, backbone: str, height: int, width: int) -> Path:
    import torch

    from rmgl.engine import load_config
    from rmgl.engine.checkpoint import save_checkpoint
    from rmgl.engine.config import to_yaml
    from rmgl.engine.load import model_config
    from rmgl.model import build_model

    if path.exists():
        return path
    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={path.parent}",
            f"data.height={height}",
            f"data.width={width}",
            f"model.backbone={backbone}",
            "model.pretrained=none",
        ],
    )
    torch.manual_seed(0)
    model = build_model(model_config(cfg), 751)
    return save_checkpoint(path, model, to_yaml(cfg), {"num_classes": 751, "epoch": 0})


def make_gallery(work: Path, size: int, provenance: dict) -> Path:
    """A synthetic gallery feature folder recorded as the model's descriptors."""
    folder = work / f"gallery_{size}_{provenance['model_sha256'][:8]}"
    if (folder / "done").exists():
        return folder
    gen = Generator(size // 10)
    pids = np.arange(size) // 10
    blocks = (gen.images(pids[s : s + 8192], 1000 + s // 8192) for s in range(0, size, 8192))
    write_folder(folder, blocks, pids, size)
    meta = {
        "format": "rmgl-features-v1",
        **provenance,
        "count": size,
        "complete": True,
        "synthetic": True,
    }
    (folder / "extract.json").write_text(json.dumps(meta))
    (folder / "done").write_text("")
    return folder


def make_index(work: Path, gallery: Path, kind: str) -> Path:
    from rmgl.deploy.index import GalleryIndex

    index = work / f"{gallery.name}_{kind}.idx"
    pristine = work / f"{gallery.name}_{kind}.pristine.idx"
    if not pristine.exists():
        started = time.perf_counter()
        GalleryIndex.build(gallery, pristine, kind=kind)
        print(f"  built {kind} in {time.perf_counter() - started:.0f} s", flush=True)
    subprocess.run(["rm", "-rf", str(index)], check=True)
    subprocess.run(["cp", "-r", str(pristine), str(index)], check=True)  # adds change it
    return index


def crop(seed: int) -> bytes:
    """A new 128x64 JPEG crop (random pixels: a new gallery image for every seed)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (128, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM) of a process."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(line.split()[1]) / 1024
    return found


class Server:
    def __init__(self, index: Path, checkpoint: Path, work: Path, threads: int) -> None:
        import httpx2

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (work / "token").write_text(TOKEN)
        (work / "token").chmod(0o600)
        self.log = open(work / f"server-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rmgl.cli", "serve", "--index", str(index)]
            + ["--checkpoint", str(checkpoint), "--device", "cpu", "--port", str(self.port)]
            + ["--token-file", str(work / "token"), "--max-images", "64"]
            + ["--threads", str(threads)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx2.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.5)
        self.process.kill()
        raise RuntimeError(f"the server did not start; see {self.log.name}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(300)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        return code


# ---- measurements


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def side_by_side(rounds: int, in_process, over_http) -> dict:
    """p50 / p99 (ms) of both calls, alternating inside every round (after one warm-up)."""
    in_process(0)
    over_http(0)
    local, remote = [], []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        in_process(number)
        local.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        over_http(number)
        remote.append(1000 * (time.perf_counter() - started))
    (lp50, lp99), (rp50, rp99) = percentiles(local), percentiles(remote)
    return {
        "rounds": rounds,
        "in_process_p50": lp50,
        "in_process_p99": lp99,
        "http_p50": rp50,
        "http_p99": rp99,
        "overhead_ms": rp50 - lp50,
        "overhead_fraction": (rp50 - lp50) / lp50,
        "goal_met": rp50 - lp50 <= max(0.10 * lp50, 5.0),
    }


def latencies(server: Server, service, queries: np.ndarray, kind: str, rounds: int, embed: bool):
    import httpx2

    from rmgl.serve.images import decode_image

    results = {}
    with httpx2.Client(base_url=server.url, timeout=600) as http:

        def local_search(number: int) -> None:
            service.search(queries[number % len(queries)], k=10)

        def remote_search(number: int) -> None:
            response = http.post(
                "/v1/search", json={"descriptor": queries[number % len(queries)].tolist(), "k": 10}
            )
            assert response.status_code == 200, response.text
            response.json()

        def remote_search_base64(number: int) -> None:
            packed = base64.b64encode(queries[number % len(queries)].astype("<f4").tobytes())
            response = http.post("/v1/search", json={"descriptor_b64": packed.decode(), "k": 10})
            assert response.status_code == 200, response.text
            response.json()

        for key, remote in (
            (f"search {kind}, descriptor as a JSON list", remote_search),
            (f"search {kind}, descriptor as base64", remote_search_base64),
        ):
            results[key] = side_by_side(rounds, local_search, remote)
            print(f"  {key}: {results[key]}", flush=True)
        if not embed:
            return results
        for batch, batch_rounds in ((1, 30), (32, 8)):
            images = [crop(10_000_000 + i) for i in range(batch)]

            def local_embed(_: int, images=images) -> None:
                decoded = [decode_image(d, f"image {i}", 12_000_000) for i, d in enumerate(images)]
                service.embed(decoded)

            def remote_embed(_: int, images=images, encoding="json") -> None:
                files = [("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images)]
                response = http.post(f"/v1/embed?encoding={encoding}", files=files)
                assert response.status_code == 200, response.text
                response.json()

            for encoding in ("json", "base64"):
                key = f"embed batch {batch}, descriptors as {encoding}"
                remote = lambda number, encoding=encoding: remote_embed(number, encoding=encoding)  # noqa: E731
                results[key] = side_by_side(batch_rounds, local_embed, remote)
                print(f"  {key}: {results[key]}", flush=True)
    return results


def load_run(server: Server, queries: np.ndarray, clients: int, duration: float, seed: int):
    """Clients searching (9 of 10 requests) and adding new crops (1 of 10) for ``duration``
    seconds; then every add that returned 200 is checked in the gallery."""
    import httpx2

    before = httpx2.get(server.url + "/v1/gallery").json()["count"]
    errors: list[str] = []
    added: list[tuple[int, bytes]] = []
    counts = {"search": [], "add": []}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client(number: int) -> None:
        rng = np.random.default_rng(seed * 1000 + number)
        with httpx2.Client(base_url=server.url, timeout=600) as http:
            step = 0
            while time.monotonic() < stop_at:
                step += 1
                started = time.perf_counter()
                try:
                    if step % 10 == 1:  # an add first: every client adds, however slow
                        data = crop(seed * 1_000_000 + number * 10_000 + step)
                        response = http.post(
                            "/v1/gallery",
                            files=[("images", ("c.jpg", data, "image/jpeg"))],
                            data={"camera": str(number % 6)},
                            headers={"Authorization": f"Bearer {TOKEN}"},
                        )
                        what = "add"
                    else:
                        query = queries[int(rng.integers(len(queries)))]
                        response = http.post(
                            "/v1/search", json={"descriptor": query.tolist(), "k": 10}
                        )
                        what = "search"
                except httpx2.HTTPError as err:
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
                    continue
                took = time.perf_counter() - started
                with lock:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code} {response.text[:200]}")
                        continue
                    counts[what].append(took)
                    if what == "add":
                        added.append((response.json()["added"][0]["id"], data))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    lost = check_adds(server, before, added)
    return {
        "clients": clients,
        "seconds": elapsed,
        "searches": len(counts["search"]),
        "adds": len(counts["add"]),
        "requests_per_s": (len(counts["search"]) + len(counts["add"])) / elapsed,
        "searches_per_s": len(counts["search"]) / elapsed,
        "search_p50_ms": 1000 * percentiles(counts["search"])[0] if counts["search"] else None,
        "search_p99_ms": 1000 * percentiles(counts["search"])[1] if counts["search"] else None,
        "add_p50_ms": 1000 * percentiles(counts["add"])[0] if counts["add"] else None,
        "errors": len(errors),
        "error_examples": errors[:3],
        "lost_or_wrong_adds": lost,
        "server_memory_mb": memory_mb(server.process.pid),
    }


def check_adds(server: Server, before: int, added: list[tuple[int, bytes]]) -> int:
    """Adds that returned 200 but are not in the gallery exactly as returned."""
    import httpx2

    from rmgl.deploy.index import crop_path

    info = httpx2.get(server.url + "/v1/gallery").json()
    wrong = 0 if info["count"] == before + len(added) else abs(info["count"] - before - len(added))
    ids = sorted(item for item, _ in added)
    if ids != list(range(before, before + len(added))):
        wrong += 1
    with httpx2.Client(base_url=server.url, timeout=600) as http:
        for item, data in added:
            path = http.get(f"/v1/gallery/{item}").json().get("path")
            hits = http.post("/v1/search", json={"item": item, "k": 1}).json()["hits"]
            if path != crop_path(data, ".jpg") or hits[0]["id"] != item:
                wrong += 1
    return wrong


# ---- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--kinds", nargs="+", default=["flat", "pcaflat"])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--rounds", type=int, default=60, help="search rounds (each side)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load run")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="CPU threads of torch and faiss"
    )
    parser.add_argument("--work", default="/tmp/rmgl-serve-bench")
    parser.add_argument("--results", help="write the results (JSON) here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from rmgl.serve.service import GalleryService, set_threads
    from rmgl.serve.settings import ServeSettings

    set_threads(args.threads)

    conditions = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }
    print(conditions, flush=True)
    checkpoint = make_checkpoint(work / f"{args.model}.safetensors", *MODELS[args.model])
    from rmgl.deploy.encoder import Encoder

    encoder = Encoder(checkpoint, device="cpu", batch_size=32)
    gallery = make_gallery(work, args.gallery, encoder.provenance())
    generator = Generator(args.gallery // 10)
    pids = np.random.default_rng(7).integers(0, args.gallery // 10, 200)
    queries = generator.images(pids, 99)
    assert queries.shape[1] == DIM
    results = {"conditions": conditions, "args": vars(args), "kinds": {}}
    for number, kind in enumerate(args.kinds):
        index = make_index(work, gallery, kind)
        server = Server(index, checkpoint, work, args.threads)
        found: dict = {}
        try:
            print(f"{kind}: server up, {memory_mb(server.process.pid)}", flush=True)
            settings = ServeSettings(index=index, model=checkpoint, threads=args.threads)
            service = GalleryService.open(settings, encoder=encoder)
            rounds = args.rounds if kind == "flat" else 4 * args.rounds
            found.update(latencies(server, service, queries, kind, rounds, embed=number == 0))
            service.close()
            del service
            found["memory_before_load_mb"] = memory_mb(server.process.pid)
            found["load"] = []
            for clients in args.clients:
                run = load_run(server, queries, clients, args.duration, seed=100 * number + clients)
                print(f"  load {kind}: {run}", flush=True)
                found["load"].append(run)
        finally:
            found["server_exit"] = server.stop()
        results["kinds"][kind] = found
    conditions["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1, default=str))
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
