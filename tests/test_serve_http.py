"""rmgl serve as a real server: uvicorn in a subprocess on a loopback port, clients over
HTTP. Concurrent clients lose and duplicate nothing, the web page works in headless
Chromium, SIGTERM lets the requests in flight finish, kill -9 in the middle of an add
leaves the last committed state, and two worker processes see each other's adds."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
httpx2 = pytest.importorskip("httpx2")

from serve_support import TOKEN, Server, auth, noise_png, serve_data  # noqa: E402

from rmgl.deploy.index import GalleryIndex, crop_path  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return serve_data(tmp_path_factory)


@pytest.fixture(scope="module")
def work(setup, tmp_path_factory):
    """A copy of the gallery index and a token file only its owner can read."""
    root = tmp_path_factory.mktemp("http")
    setup.copy_index(root / "g.idx")
    (root / "token").write_text(TOKEN + "\n")
    (root / "token").chmod(0o600)
    return root


@pytest.fixture(scope="module")
def servers(setup, work):
    """The server shared by this module's tests, in a list: the kill -9 test replaces it by
    a restarted one, the SIGTERM test stops it."""
    running = [Server(work / "g.idx", setup.checkpoint, work / "token").wait_ready()]
    yield running
    running[0].stop()


@pytest.fixture
def server(servers):
    return servers[0]


def add(url: str, *images: bytes, **fields) -> httpx2.Response:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx2.post(url + "/v1/gallery", files=files, data=fields, headers=auth(), timeout=120)


def search_image(url: str, data: bytes, k: int = 3) -> httpx2.Response:
    files = [("image", ("q.png", data, "image/png"))]
    return httpx2.post(url + "/v1/search", files=files, data={"k": str(k)}, timeout=120)


def test_the_server_says_where_it_listens_and_refuses_a_body_by_its_length(server):
    assert f"listening on {server.url}/ (loopback only" in server.text()
    assert "adds and deletes need the token" in server.text()
    assert httpx2.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx2.get(server.url + "/readyz").json()["ready"] is True
    # a declared length over the limit is refused before the body is read
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b"
            b"\r\nContent-Length: 999999999\r\n\r\n"
        )
        response = b""
        while chunk := raw.recv(4096):  # the server answers and closes the connection
            response += chunk
        response = response.decode()
    assert response.startswith("HTTP/1.1 413") and "20,971,520 bytes" in response


def test_eight_clients_adding_and_searching_lose_and_duplicate_nothing(setup, server, work):
    """8 clients, each adding 6 new crops one or two at a time and searching with them at
    once; two clients also race to add the same crop. Afterwards the index holds exactly
    the images whose add returned 200, each once, under the id its add returned."""
    before = httpx2.get(server.url + "/v1/gallery").json()["count"]
    results, failures = [], []

    def client(number: int) -> None:
        with httpx2.Client(base_url=server.url, timeout=120) as http:
            for step in range(4):
                images = [noise_png(1000 + 10 * number + 2 * step + i) for i in range(1 + step % 2)]
                files = [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
                response = http.post("/v1/gallery", files=files, headers=auth())
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                for data, entry in zip(images, response.json()["added"]):
                    results.append((data, entry["id"]))
                    found = http.post(
                        "/v1/search",
                        files=[("image", ("q.png", data, "image/png"))],
                        data={"k": "1"},
                    ).json()["hits"][0]
                    if found["id"] != entry["id"]:
                        failures.append(f"search after add found {found['id']}, not {entry['id']}")
                by_item = http.post("/v1/search", json={"item": entry["id"], "k": 2})
                if by_item.status_code != 200:
                    failures.append(by_item.text)

    race = noise_png(999)
    with ThreadPoolExecutor(10) as pool:
        racing = [pool.submit(add, server.url, race) for _ in range(2)]
        for future in [pool.submit(client, n) for n in range(8)]:
            future.result()
        raced = [future.result() for future in racing]
    assert not failures, failures[:3]
    assert sorted(r.status_code for r in raced) == [200, 409], [r.text for r in raced]
    winner = next(r for r in raced if r.status_code == 200).json()["added"][0]["id"]
    results.append((race, winner))
    ids = sorted(item for _, item in results)
    assert ids == list(range(before, before + len(results)))  # no gap, no duplicate
    info = httpx2.get(server.url + "/v1/gallery").json()
    assert info["count"] == info["live"] == before + len(results) == before + 8 * 6 + 1
    index = GalleryIndex.open(work / "g.idx")
    items = index.store.items(ids)
    for data, item in results:
        assert items[item].path == crop_path(data, ".png")
        assert (work / "g.idx" / items[item].path).read_bytes() == data
    assert len(list((work / "g.idx" / "crops").rglob("*.png"))) == len(results)


def test_the_page_searches_through_its_own_form_in_chromium(setup, server, tmp_path):
    from browser_support import DevToolsPage, find_browser

    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium binary (apt-get install -y chromium; .ci/run does when it can)")
    rows = (setup.features / "images.csv").read_text().splitlines()[1:]
    query = Path(rows[7].split(",")[1])  # gallery item 7: its own crop is the first hit
    with DevToolsPage(browser, tmp_path / "profile") as page:
        page.navigate(server.url + "/")
        page.wait_for("document.querySelectorAll('#cameras input').length > 0")
        page.set_files("#query-file", [query])
        page.wait_for("!document.getElementById('query-preview').hidden")
        page.click("#search-button")
        page.wait_for("document.body.dataset.searches === '1'")
        loaded = (
            "Array.from(document.images).filter(i => !i.hidden).every("
            "i => i.complete && i.naturalWidth > 0)"
        )
        page.wait_for(loaded)
        hits = page.evaluate(
            "Array.from(document.querySelectorAll('.hit')).map(h => +h.dataset.id)"
        )
        assert hits[0] == 7 and len(hits) == 20
        shot = page.screenshot(tmp_path / "page.png")
        # click a hit: the page searches from that gallery item
        page.click(".hit:nth-child(3)")
        page.wait_for("document.body.dataset.searches === '2'")
        page.wait_for(loaded)
        again = page.evaluate("+document.querySelector('.hit').dataset.id")
        images = page.evaluate("document.images.length")
        assert page.errors == [], page.errors
    assert again == hits[2]
    assert images == 21  # the query and its 20 hits
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1000, 1280)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500


def test_kill_9_during_an_add_leaves_the_last_committed_state(setup, servers, work):
    """kill -9 while an add commits (the writer lock is held): after a restart the index
    is at a committed state (without the add, or with all of it) and answers as before;
    the next add cleans up what the killed one left and finds every id free."""
    first = servers[0]
    queries = [noise_png(1000 + i) for i in range(0, 80, 7)]
    answers = [search_image(first.url, q, 5).json()["hits"] for q in queries]
    count = httpx2.get(first.url + "/v1/gallery").json()["count"]
    images = [noise_png(7000 + i) for i in range(60)]
    threading.Thread(target=lambda: _ignore_errors(add, first.url, *images), daemon=True).start()
    wait_for_the_commit(work / "g.idx")
    os.kill(first.process.pid, signal.SIGKILL)
    assert first.stop() == -signal.SIGKILL
    second = Server(work / "g.idx", setup.checkpoint, work / "token").wait_ready()
    servers[0] = second  # the next test stops it
    now = httpx2.get(second.url + "/v1/gallery").json()["count"]
    assert now in (count, count + 60)
    if now == count:  # killed before its commit: as if it never happened
        assert [search_image(second.url, q, 5).json()["hits"] for q in queries] == answers
        assert httpx2.get(f"{second.url}/v1/gallery/{count}").status_code == 404
        retry = add(second.url, *images)
        assert retry.status_code == 200, retry.text
        assert retry.json()["added"][0]["id"] == count
    crops = {p.name for p in (work / "g.idx" / "crops").rglob("*.png")}
    assert {Path(crop_path(data, ".png")).name for data in images} <= crops
    index = GalleryIndex.open(work / "g.idx")
    assert index.count == count + 60 and len(index.vectors) == index.count


def test_sigterm_lets_the_add_in_flight_finish_and_closes_the_index(setup, servers, work):
    """An add whose commit has started when SIGTERM arrives still answers 200 and is in the
    index; the server then closes the index and exits."""
    server = servers[0]
    before = httpx2.get(server.url + "/v1/gallery").json()["count"]
    images = [noise_png(5000 + i) for i in range(40)]
    answer: dict = {}
    adding = threading.Thread(target=lambda: answer.update(response=add(server.url, *images)))
    adding.start()
    wait_for_the_commit(work / "g.idx")
    server.process.send_signal(signal.SIGTERM)
    adding.join(120)
    code = server.stop()
    assert answer["response"].status_code == 200, answer["response"].text
    assert code in (0, -signal.SIGTERM)
    log = server.text()
    assert "Shutting down" in log and f"the gallery index {work / 'g.idx'} is closed" in log
    assert "Traceback" not in log
    assert GalleryIndex.open(work / "g.idx").count == before + 40


def wait_for_the_commit(index: Path) -> None:
    """Until the writer has taken the index's lock (it notes its process there)."""
    lock = index / "writer.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.stat().st_size):
        assert time.monotonic() < deadline, "the add never took the writer lock"


def _ignore_errors(function, *args):
    try:
        function(*args)
    except httpx2.HTTPError:
        pass


def test_two_workers_see_each_others_adds(setup, tmp_path):
    """--workers 2: each worker has its own open index; an add through one is found by the
    next search through either (every search refreshes to the latest commit), concurrent
    adds through both are all kept, and /metrics counts the requests of both."""
    index = setup.copy_index(tmp_path / "g.idx")
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "token").chmod(0o600)
    server = Server(index, setup.checkpoint, tmp_path / "token", "--workers", "2").wait_ready()
    try:
        before = httpx2.get(server.url + "/v1/gallery").json()["count"]

        def add_and_find(number: int) -> list[int]:
            data = noise_png(20_000 + number)
            response = add(server.url, data)  # a new connection each time: either worker
            assert response.status_code == 200, response.text
            item = response.json()["added"][0]["id"]
            for _ in range(4):
                hits = httpx2.post(server.url + "/v1/search", json={"item": item, "k": 1})
                assert hits.status_code == 200 and hits.json()["hits"][0]["id"] == item
                assert httpx2.get(f"{server.url}/v1/gallery/{item}/image").content == data
            return item

        with ThreadPoolExecutor(6) as pool:
            items = sorted(pool.map(add_and_find, range(12)))
        assert items == list(range(before, before + 12))
        for _ in range(4):
            assert httpx2.get(server.url + "/v1/gallery").json()["live"] == before + 12
        metrics = httpx2.get(server.url + "/metrics").text  # summed over both workers
        added = [
            line
            for line in metrics.splitlines()
            if line.startswith('rmgl_http_requests_total{endpoint="/v1/gallery",method="POST"')
        ]
        assert added and float(added[0].rsplit(" ", 1)[1]) == 12
        assert server.text().count("Started server process") == 2
    finally:
        server.stop()
