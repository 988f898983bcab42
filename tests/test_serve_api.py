"""rmgl serve through FastAPI's in-process client: parity with rmgl extract and rmgl search,
adds, deletion and retention, authentication, limits, and one JSON line for every bad
input (the list of bad inputs tried is BAD_INPUTS below)."""

from __future__ import annotations

import base64
import io
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serve_support import TOKEN, auth, noise_png, png_header_only, serve_data  # noqa: E402

from rmgl.cli import main  # noqa: E402
from rmgl.deploy.index import FeatureRecord, GalleryIndex  # noqa: E402
from rmgl.deploy.search import search  # noqa: E402
from rmgl.serve import GalleryService, ServeSettings, create_app  # noqa: E402
from rmgl.serve.service import SOURCE  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return serve_data(tmp_path_factory)


@pytest.fixture(scope="module")
def service(setup, tmp_path_factory):
    """One service (model loaded once) over a copy of the gallery index."""
    index = setup.copy_index(tmp_path_factory.mktemp("api") / "g.idx")
    opened = GalleryService.open(
        ServeSettings(index=index, model=setup.checkpoint, device="cpu", token=TOKEN)
    )
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service=service))


def files(*items: tuple[str, bytes], field: str = "images") -> list:
    return [(field, (name, data, "application/octet-stream")) for name, data in items]


def image_files(paths: list[Path], field: str = "images") -> list:
    return files(*((p.name, p.read_bytes()) for p in paths), field=field)


def hits_of(response) -> list[tuple]:
    assert response.status_code == 200, response.text
    return [(h["id"], round(h["distance"], 6)) for h in response.json()["hits"]]


# ---- parity with the command line


def test_embed_equals_rmgl_extract_for_the_same_files(setup, client):
    """The gallery's feature folder was written by rmgl extract (one batch of all images);
    the same files in one request give the same numbers."""
    images = [Path(row.split(",")[1]) for row in (setup.features / "images.csv").read_text().splitlines()[1:]]  # fmt: skip
    extracted = np.load(setup.features / "features.npy")
    response = client.post("/v1/embed", files=image_files(images))
    assert response.status_code == 200, response.text
    body = response.json()
    served = np.array(body["descriptors"], dtype=np.float32)
    assert served.shape == extracted.shape == (len(setup.gallery_images), body["dim"])
    assert np.abs(served - extracted).max() <= 1e-6
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    meta = json.loads((setup.features / "extract.json").read_text())
    assert body["model"]["weights_sha256"] == meta["model_sha256"]
    packed = client.post("/v1/embed?encoding=base64", files=image_files(images[:2])).json()
    unpacked = [np.frombuffer(base64.b64decode(row), "<f4") for row in packed["descriptors"]]
    np.testing.assert_array_equal(np.stack(unpacked), served[:2])


def test_search_by_image_gives_the_hits_of_rmgl_search(setup, service, client, tmp_path):
    query = setup.query_images[1]
    out = tmp_path / "hits.json"
    argv = ["search", "--index", str(service.index.path), "--images", str(query)]
    argv += ["--checkpoint", str(setup.checkpoint), "--device", "cpu", "--k", "6"]
    assert main([*argv, "--out", str(out)]) == 0
    expected = json.loads(out.read_text())["queries"][0]["results"]
    response = client.post("/v1/search", files=image_files([query], "image"), data={"k": "6"})
    assert_same_hits(response, expected)


@pytest.mark.parametrize(
    "options, form",
    [
        ({"cameras": [1, 2], "frames": (80, 100)}, {"cameras": "1,2", "start": "80", "end": "100"}),
        ({"rerank": True, "rerank_shortlist": 12}, {"rerank": "true", "rerank_shortlist": "12"}),
        ({"metric": "cosine"}, {"metric": "cosine"}),
    ],
)
def test_search_options_give_the_hits_of_the_library_search(setup, service, client, options, form):
    """Filters, re-ranking and metrics: the hits of rmgl.deploy.search.search (what rmgl search
    runs) for the descriptor the service computes of the query image."""
    query = setup.query_images[2]
    descriptor = client.post("/v1/embed", files=image_files([query])).json()["descriptors"]
    expected = search(service.index, np.array(descriptor, np.float32), 6, **options)
    response = client.post(
        "/v1/search", files=image_files([query], "image"), data={"k": "6", **form}
    )
    assert_same_hits(response, list(expected.hits(0)))


def assert_same_hits(response, expected: list[dict]) -> None:
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert [h["id"] for h in hits] == [h["id"] for h in expected] and len(hits) >= 3
    for got, want in zip(hits, expected):
        assert got["image_url"] == f"/v1/gallery/{want['id']}/image"
        assert abs(got["distance"] - want["distance"]) <= 1e-6
        for key in ("path", "pid", "camid", "frame", "rerank_distance"):
            assert got.get(key) == pytest.approx(want.get(key), abs=1e-6), key


def test_search_by_descriptor_and_by_gallery_item(setup, service, client):
    features = np.load(setup.features / "features.npy")
    by_descriptor = client.post(
        "/v1/search", json={"descriptor": (3 * features[4]).tolist(), "k": 5}
    )
    first = by_descriptor.json()["hits"][0]
    assert first["id"] == 4 and first["distance"] < 1e-3  # normalised by the service
    by_item = client.post("/v1/search", json={"item": 4, "k": 5})
    # the same vector, normalised twice: equal up to float32 rounding (which sqrt(2 - 2 q.g)
    # magnifies near 0)
    assert [h[0] for h in hits_of(by_item)] == [h[0] for h in hits_of(by_descriptor)]
    np.testing.assert_allclose(
        [h[1] for h in hits_of(by_item)], [h[1] for h in hits_of(by_descriptor)], atol=1e-3
    )
    assert by_item.json()["query"]["item"] == 4
    packed = base64.b64encode((3 * features[4]).astype("<f4").tobytes()).decode()
    by_base64 = client.post("/v1/search", json={"descriptor_b64": packed, "k": 5})
    assert hits_of(by_base64) == hits_of(by_descriptor)
    # the cross-camera protocol takes the item's own pid and camera
    item = service.index.store.item(4)
    protocol = client.post("/v1/search", json={"item": 4, "k": 5, "exclude_same_camera": True})
    expected = search(
        service.index,
        features[4:5],
        5,
        query_records=[FeatureRecord("", item.pid, item.camid, None)],
        exclude_same_camera=True,
    )
    assert [h[0] for h in hits_of(protocol)] == expected.ids[0].tolist()
    assert 4 not in expected.ids[0]


# ---- adds, items, images


def test_added_images_are_searchable_at_once_and_served_back(service, client):
    data = [noise_png(1), noise_png(2)]
    response = client.post(
        "/v1/gallery",
        files=files(("a.png", data[0]), ("../../etc/b.png", data[1])),
        data={"camera": "7", "timestamp": "2026-11-26T10:00:00Z", "source": "door 3"},
        headers=auth(),
    )
    assert response.status_code == 200, response.text
    added = response.json()["added"]
    first = added[0]["id"]
    assert [a["id"] for a in added] == [first, first + 1]
    for entry, raw in zip(added, data):
        assert entry["path"].startswith("crops/") and ".." not in entry["path"]
        assert (service.index.path / entry["path"]).read_bytes() == raw
        image = client.get(entry["image_url"])
        assert image.status_code == 200 and image.content == raw
        assert image.headers["content-type"] == "image/png"
    hits = client.post(
        "/v1/search", files=files(("q.png", data[1]), field="image"), data={"k": "1"}
    )
    assert hits.json()["hits"][0]["id"] == first + 1
    assert hits.json()["hits"][0]["distance"] < 1e-3
    item = client.get(f"/v1/gallery/{first + 1}").json()
    when = datetime(2026, 11, 26, 10, tzinfo=timezone.utc).timestamp()
    assert item["camid"] == 7 and item["frame"] == when
    assert item["upload"]["source"] == "door 3" and item["upload"]["filename"] == ".._.._etc_b.png"
    info = client.get("/v1/gallery").json()
    assert 7 in info["cameras"] and info["live"] == info["count"] == first + 2
    again = client.post("/v1/gallery", files=files(("c.png", data[0])), headers=auth())
    assert again.status_code == 409 and f"item {first}" in again.json()["error"]


def test_deletion_and_retention_survive_a_restart(setup, service, tmp_path):
    """Delete by id and by time: the items never come back (search, item, image), their
    crops leave the disk, and a new service on the same folder answers the same."""
    settings = ServeSettings(
        index=setup.copy_index(tmp_path / "g.idx"), model=setup.checkpoint, token=TOKEN
    )
    own = GalleryService.open(settings, encoder=service.encoder)
    client = TestClient(create_app(service=own))
    added = client.post(
        "/v1/gallery",
        files=files(*((f"{i}.png", noise_png(100 + i)) for i in range(3))),
        data={"timestamp": ["1000000", "2000000", "3000000"], "camera": "5"},
        headers=auth(),
    ).json()["added"]
    ids = [a["id"] for a in added]
    removed = client.delete(f"/v1/gallery?ids={ids[0]}", headers=auth())
    assert removed.status_code == 200 and removed.json()["deleted"] == 1
    # retention: everything before 2,500,000 (the gallery's frames and the second upload)
    removed = client.request("DELETE", "/v1/gallery", json={"before": 2_500_000}, headers=auth())
    assert removed.json() == {"deleted": len(setup.gallery_images) + 1, "generation": 4, "live": 1}
    assert not (settings.index / added[0]["path"]).exists()
    assert not (settings.index / added[1]["path"]).exists()
    for service_now in (own, None):
        if service_now is None:  # a restart: a new service on the same folder
            own.close()
            service_now = GalleryService.open(settings, encoder=service.encoder)
            client = TestClient(create_app(service=service_now))
        result = client.post("/v1/search", files=files(("q.png", noise_png(100)), field="image"))
        assert [h["id"] for h in result.json()["hits"]] == [ids[2]]
        for item in ids[:2]:
            assert client.get(f"/v1/gallery/{item}").status_code == 404
            assert client.get(f"/v1/gallery/{item}/image").status_code == 404
            assert client.post("/v1/search", json={"item": item}).status_code == 404
    service_now.close()


# ---- authentication


def test_writes_need_the_token_and_it_is_never_logged(client, caplog):
    upload = files(("x.png", noise_png(7)))
    with caplog.at_level(logging.WARNING, "rmgl.serve"):
        missing = client.post("/v1/gallery", files=upload)
        wrong = client.post("/v1/gallery", files=upload, headers=auth("not-the-token-at-all"))
        deleting = client.delete("/v1/gallery?ids=0", headers={"Authorization": "Basic abc"})
    for response in (missing, wrong, deleting):
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert wrong.json()["error"] == "wrong token"
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "no token" in logged and "wrong token" in logged
    assert "not-the-token-at-all" not in logged and TOKEN not in logged
    assert client.get("/v1/gallery/0").status_code == 200  # reads are open by default


def test_auth_all_guards_reads_and_a_tokenless_server_is_read_only(service):
    strict = TestClient(
        create_app(ServeSettings(index="x", model="y", token=TOKEN, auth="all"), service)
    )
    for path in ("/v1/gallery", "/v1/gallery/0", "/v1/gallery/0/image", "/metrics"):
        assert strict.get(path).status_code == 401, path
        assert strict.get(path, headers=auth()).status_code == 200, path
    assert strict.post("/v1/search", json={"item": 0}).status_code == 401
    for path in ("/", "/healthz", "/readyz"):
        assert strict.get(path).status_code == 200, path
    read_only = TestClient(create_app(ServeSettings(index="x", model="y"), service))
    refused = read_only.post("/v1/gallery", files=files(("x.png", noise_png(8))), headers=auth())
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    assert read_only.post("/v1/search", json={"item": 0}).status_code == 200


# ---- limits


def test_limits_refuse_before_any_work(service):
    small = ServeSettings(
        index="x", model="y", token=TOKEN, max_body_bytes=60_000, max_images=3, max_pixels=10_000,
        max_k=50,
    )  # fmt: skip
    client = TestClient(create_app(small, service))
    big = client.post("/v1/embed", files=files(("big.png", noise_png(1, (200, 200)))))
    assert big.status_code == 413 and "60,000 bytes" in big.json()["error"]

    def chunks():  # no Content-Length: counted as it streams in
        yield b"--b\r\nContent-Disposition: form-data; name=images; filename=a.png\r\n\r\n"
        for _ in range(100):
            yield b"x" * 1000

    streamed = client.post(
        "/v1/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413
    many = client.post("/v1/embed", files=files(*((f"{i}.png", noise_png(i)) for i in range(4))))
    assert many.status_code == 413 and "--max-images" in many.json()["error"]
    pixels = client.post("/v1/embed", files=files(("p.png", noise_png(1, (120, 100)))))
    assert pixels.status_code == 413 and "120 x 100 pixels" in pixels.json()["error"]
    # a header claiming 50,000 x 50,000 pixels over 60 bytes of data: refused from the header
    for size in ((50_000, 50_000), (100_000, 100_000)):
        bomb = client.post("/v1/embed", files=files(("bomb.png", png_header_only(*size))))
        assert bomb.status_code == 413, bomb.text
    assert client.post("/v1/search", json={"item": 0, "k": 51}).status_code == 400


# ---- every bad input: one JSON line with a 4xx


def _jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (80, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 40)).save(buffer, format="GIF")
    return buffer.getvalue()


W = auth()
BAD_INPUTS = [
    # (what, method, path, request arguments, status, part of the message)
    ("embed with JSON", "POST", "/v1/embed", {"json": {}}, 415, "multipart/form-data"),
    ("embed without images", "POST", "/v1/embed", {"files": files(("a", b"x"), field="other")}, 400, "no image"),
    ("images as text", "POST", "/v1/embed", {"data": {"images": "a.jpg"}, "files": files(("x", b"y"), field="z")}, 400, "must be files"),
    ("a text file", "POST", "/v1/embed", {"files": files(("a.jpg", b"hello, world"))}, 415, "is not a JPEG, PNG, WebP or BMP image"),
    ("a GIF", "POST", "/v1/embed", {"files": files(("a.gif", _gif()))}, 415, "not a JPEG"),
    ("an SVG", "POST", "/v1/embed", {"files": files(("a.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"))}, 415, "not a JPEG"),
    ("a truncated JPEG", "POST", "/v1/embed", {"files": files(("t.jpg", _jpeg()[:1500]))}, 400, "damaged JPEG"),
    ("an empty file", "POST", "/v1/embed", {"files": files(("e.jpg", b""))}, 400, "is empty"),
    ("an unknown embed field", "POST", "/v1/embed", {"files": files(("a.jpg", _jpeg())), "data": {"k": "3"}}, 400, "k: unknown field"),
    ("search without a query", "POST", "/v1/search", {"json": {"k": 3}}, 400, "give one query"),
    ("search with two queries", "POST", "/v1/search", {"json": {"item": 1, "descriptor": [1.0]}}, 400, "not two"),
    ("a descriptor of the wrong length", "POST", "/v1/search", {"json": {"descriptor": [1.0, 0.0]}}, 400, "has 2 numbers"),
    ("descriptor_b64 that is not base64", "POST", "/v1/search", {"json": {"descriptor_b64": "%%%"}}, 400, "descriptor_b64 is not base64"),
    ("descriptor_b64 of 5 bytes", "POST", "/v1/search", {"json": {"descriptor_b64": "AAAAAAA="}}, 400, "holds 5 bytes"),
    ("a descriptor given twice", "POST", "/v1/search", {"json": {"descriptor": [1.0], "descriptor_b64": "AAAAAA=="}}, 400, "not two"),
    ("an unknown embed encoding", "POST", "/v1/embed?encoding=hex", {"files": files(("a.jpg", _jpeg()))}, 400, "encoding: "),
    ("a zero descriptor", "POST", "/v1/search", {"json": {"descriptor": [0.0] * 3584}}, 400, "norm 0"),
    ("a descriptor of strings", "POST", "/v1/search", {"json": {"descriptor": ["a"]}}, 400, "descriptor.0"),
    ("k = 0", "POST", "/v1/search", {"json": {"item": 1, "k": 0}}, 400, "k: Input should be greater than or equal to 1"),
    ("k as words", "POST", "/v1/search", {"json": {"item": 1, "k": "ten"}}, 400, "k: "),
    ("a misspelt field", "POST", "/v1/search", {"json": {"item": 1, "kk": 3}}, 400, "kk: unknown field"),
    ("a camera the gallery lacks", "POST", "/v1/search", {"json": {"item": 1, "cameras": [99]}}, 400, "no live gallery item has camera 99; the cameras of the gallery are"),
    ("start after end", "POST", "/v1/search", {"json": {"item": 1, "start": 10, "end": 5}}, 400, "start 10 is after end 5"),
    ("a time that is no time", "POST", "/v1/search", {"json": {"item": 1, "start": "yesterday"}}, 400, "neither a number nor an ISO 8601 time"),
    ("a time without zone", "POST", "/v1/search", {"json": {"item": 1, "end": "2026-11-26T10:00:00"}}, 400, "has no time zone"),
    ("an unknown metric", "POST", "/v1/search", {"json": {"item": 1, "metric": "manhattan"}}, 400, "metric: "),
    ("a negative item", "POST", "/v1/search", {"json": {"item": -1}}, 400, "item: "),
    ("an item that does not exist", "POST", "/v1/search", {"json": {"item": 10**6}}, 404, "no gallery item 1000000"),
    ("the protocol without pid", "POST", "/v1/search", {"json": {"descriptor": [1.0] + [0.0] * 3583, "exclude_same_camera": True}}, 400, "needs the pid and camera"),
    ("a shortlist below k", "POST", "/v1/search", {"json": {"item": 1, "k": 10, "rerank": True, "rerank_shortlist": 5}}, 400, "rerank_shortlist (5) must be >= k (10)"),
    ("a JSON array", "POST", "/v1/search", {"json": [1, 2]}, 400, "Input should be a valid dictionary"),
    ("broken JSON", "POST", "/v1/search", {"content": b'{"item": ', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("plain text", "POST", "/v1/search", {"content": b"item=1", "headers": {"content-type": "text/plain"}}, 415, "send application/json"),
    ("two query images", "POST", "/v1/search", {"files": files(("a.jpg", _jpeg()), ("b.jpg", _jpeg()), field="image")}, 400, "one query image per search"),
    ("a form with a wrong field", "POST", "/v1/search", {"files": files(("a.jpg", _jpeg()), field="image"), "data": {"item": "1"}}, 400, "item: unknown field"),
    ("a form with k as words", "POST", "/v1/search", {"files": files(("a.jpg", _jpeg()), field="image"), "data": {"k": "many"}}, 400, "k: Input should be a valid integer"),
    ("a broken multipart body", "POST", "/v1/search", {"content": b"--x\r\nnot a part", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "multipart form could not be read"),
    ("multipart without boundary", "POST", "/v1/embed", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, "multipart form could not be read"),
    ("an id that is no number", "GET", "/v1/gallery/abc/image", {}, 400, "item_id: Input should be a valid integer"),
    ("a huge id", "GET", "/v1/gallery/99999999999999999999999/image", {}, 400, "item_id: "),
    ("a path instead of an id", "GET", "/v1/gallery/..%2F..%2Fmanifest.json/image", {}, 404, "no route"),
    ("a traversal", "GET", "/v1/gallery/../../etc/passwd", {}, 404, "no route"),
    ("an item that is not there", "GET", "/v1/gallery/123456", {}, 404, "no gallery item 123456"),
    ("delete without ids or before", "DELETE", "/v1/gallery", {"headers": W}, 400, "give ids or before"),
    ("delete ids that are words", "DELETE", "/v1/gallery?ids=a,b", {"headers": W}, 400, "ids.0: "),
    ("delete both", "DELETE", "/v1/gallery?ids=1&before=5", {"headers": W}, 400, "give ids or before (one of them)"),
    ("delete before a word", "DELETE", "/v1/gallery?before=soon", {"headers": W}, 400, "neither a number nor an ISO 8601 time"),
    ("delete ids outside the gallery", "DELETE", "/v1/gallery?ids=999999", {"headers": W}, 400, "ids 999999 are not in the index"),
    ("delete with a JSON list", "DELETE", "/v1/gallery", {"json": [1], "headers": W}, 400, "must be a JSON object"),
    ("add with a camera as words", "POST", "/v1/gallery", {"files": files(("a.png", noise_png(501))), "data": {"camera": "front"}, "headers": W}, 400, "camera must be an integer"),
    ("add with too few cameras", "POST", "/v1/gallery", {"files": files(("a.png", noise_png(502)), ("b.png", noise_png(503)), ("c.png", noise_png(504))), "data": {"camera": ["1", "2"]}, "headers": W}, 400, "2 camera values for 3 images"),
    ("add with a bad time", "POST", "/v1/gallery", {"files": files(("a.png", noise_png(505))), "data": {"timestamp": "noon"}, "headers": W}, 400, "neither a number nor an ISO 8601 time"),
    ("add with a long source", "POST", "/v1/gallery", {"files": files(("a.png", noise_png(506))), "data": {"source": "s" * 201}, "headers": W}, 400, "longer than 200"),
    ("add one file twice", "POST", "/v1/gallery", {"files": files(("a.png", noise_png(507)), ("b.png", noise_png(507))), "headers": W}, 400, "images 0 and 1 of the request are one file"),
    ("add an unknown field", "POST", "/v1/gallery", {"files": files(("a.png", noise_png(508))), "data": {"path": "/etc/passwd"}, "headers": W}, 400, "path: unknown field"),
    ("a method that does not exist", "PUT", "/v1/gallery", {}, 405, "PUT is not allowed"),
    ("a route that does not exist", "GET", "/v2/anything", {}, 404, "no route GET /v2/anything"),
]  # fmt: skip


@pytest.mark.parametrize(
    "what, method, path, arguments, status, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_one_clear_json_line(service, client, what, method, path, arguments, status, message):  # fmt: skip
    before = service.index.generation
    response = client.request(method, path, **arguments)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status
    assert message in body["error"], body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert str(service.index.path) not in body["error"]  # no server path in any message
    assert service.index.generation == before  # nothing was written


def test_an_unexpected_failure_is_a_500_without_details(service, monkeypatch, caplog):
    client = TestClient(create_app(service=service), raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise ZeroDivisionError(f"secret detail of {service.index.path}")

    monkeypatch.setattr(service, "search", broken)
    with caplog.at_level(logging.ERROR, "rmgl.serve"):
        response = client.post("/v1/search", json={"item": 1})
    assert response.status_code == 500
    error = response.json()["error"]
    assert "internal error (reference " in error and "secret" not in error
    reference = error.split("reference ")[1].split(")")[0]
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)


# ---- metrics, CORS, the page


def test_metrics_count_requests_per_endpoint_and_give_the_gallery_size(client):
    for _ in range(3):
        client.post("/v1/search", json={"item": 2, "k": 2})
    client.get("/v1/gallery/424242")
    text = client.get("/metrics").text
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    search = '{endpoint="/v1/search",method="POST"'
    assert float(lines[f'rmgl_http_requests_total{search},status="200"}}']) >= 3
    assert float(lines[f"rmgl_http_request_duration_seconds_count{search}}}"]) >= 3
    assert (
        'rmgl_http_request_duration_seconds_bucket{endpoint="/v1/search",le="0.05",method="POST"}'
        in lines
    )
    assert float(lines['rmgl_http_requests_total{endpoint="/v1/gallery/{item_id}",method="GET",status="404"}']) >= 1  # fmt: skip
    info = client.get("/v1/gallery").json()
    assert float(lines['rmgl_gallery_items{state="live"}']) == info["live"]
    assert float(lines["rmgl_gallery_generation"]) == info["generation"]


def test_cors_is_off_unless_an_origin_is_allowed(service):
    origin = {"Origin": "https://vms.example.org"}
    closed = TestClient(create_app(service=service)).get("/v1/gallery", headers=origin)
    assert "access-control-allow-origin" not in closed.headers
    settings = ServeSettings(index="x", model="y", cors_origins=("https://vms.example.org",))
    opened = TestClient(create_app(settings, service)).get("/v1/gallery", headers=origin)
    assert opened.headers["access-control-allow-origin"] == "https://vms.example.org"
    with pytest.raises(ValueError, match="no wildcard"):
        ServeSettings(index="x", model="y", cors_origins=("*",))


def test_the_page_is_self_contained_and_locked_down(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy and page.headers["x-frame-options"] == "DENY"
    html = page.text
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert "<script src" not in html and 'rel="stylesheet"' not in html
    assert " on" not in "".join(part.split(">")[0] for part in html.split("<")[1:]).replace(
        " one", ""
    )


# ---- set-up errors: one line before the port opens


def test_a_gallery_of_another_model_is_refused_naming_both(setup, tmp_path):
    from deploy_support import make_checkpoint

    other = make_checkpoint(tmp_path / "other.safetensors", setup.root / "data", seed=1)
    settings = ServeSettings(index=setup.index, model=other, device="cpu")
    with pytest.raises(
        ValueError,
        match=r"holds descriptors of another model than .*other\.safetensors \(weights_sha256 ",
    ):
        GalleryService.open(settings)  # fmt: skip
    assert GalleryIndex.open(setup.index).generation == 1  # nothing written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--index", "{tmp}/missing.idx"], "index folder {tmp}/missing.idx does not exist"),
        (["--index", "{index}", "--token-file", "{tmp}/none.txt"], "token file {tmp}/none.txt does not exist"),
        (["--index", "{index}", "--auth", "all"], "--auth all needs a token"),
        (["--index", "{index}", "--port", "70000"], "port must be <= 65535"),
        (["--index", "{index}", "--max-images", "0"], "max_images must be >= 1"),
        (["--index", "{index}", "--threads", "0"], "threads must be >= 1"),
        (["--index", "{index}", "--cors-origin", "*"], "must be one exact origin"),
        (["--index", "{index}", "--crops", "{tmp}/c"], "--crops is for --store milvus"),
        (["--store", "milvus", "--uri", "{tmp}/g.db", "--collection", "g", "--workers", "2"], "--workers > 1 needs a Milvus server"),
    ],
)  # fmt: skip
def test_the_command_refuses_a_bad_set_up_in_one_line(setup, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, index=setup.index) for a in argv]
    assert main(["serve", *argv, "--checkpoint", str(setup.checkpoint)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rmgl serve: error: {message.format(tmp=tmp_path)}"] or (
        len(err) == 1 and message.format(tmp=tmp_path) in err[0]
    ), err


def test_workers_get_the_milvus_settings_and_credentials_through_the_environment(tmp_path):
    settings = ServeSettings(
        index="http://milvus:19530", store="milvus", collection="g", model="m.onnx",
        crops=tmp_path / "crops", milvus_token="user:secret-password", workers=2,
    )  # fmt: skip
    env = settings.to_env()
    assert "secret-password" not in env["RMGL_SERVE_SETTINGS"]
    assert "secret-password" not in repr(settings)
    assert ServeSettings.from_env(env) == settings


def test_short_tokens_are_refused(tmp_path):
    (tmp_path / "token").write_text("secret\n")
    from rmgl.serve.settings import read_token

    with pytest.raises(ValueError, match="use at least 16 random ones"):
        ServeSettings(index="x", model="y", token=read_token(tmp_path / "token"))


def test_the_command_line_does_not_import_the_web_stack():
    """`rmgl --help` stays light: FastAPI, uvicorn and prometheus-client load only when
    rmgl serve runs."""
    import subprocess
    import sys

    code = (
        "import sys; from rmgl.cli import build_parser; "
        "build_parser().parse_args(['serve', '--index', 'x', '--checkpoint', 'y']); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_threads_apply_to_the_threads_that_serve_requests(setup, service, tmp_path):
    """OpenMP keeps its thread count per thread: --threads must reach the pool threads that
    run the searches, not only the main thread."""
    import threading

    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    settings = ServeSettings(index=setup.index, model=setup.checkpoint, threads=1)
    own = GalleryService.open(settings, encoder=service.encoder)
    seen = []

    def request() -> None:
        faiss.omp_set_num_threads(2)  # a fresh pool thread: the library default
        own.search(item=0, k=1)
        seen.append(faiss.omp_get_max_threads())

    try:
        thread = threading.Thread(target=request)
        thread.start()
        thread.join()
        assert seen == [1]
    finally:
        own.close()
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


# ---- the Milvus store


def test_a_milvus_gallery_serves_the_hits_of_the_faiss_one(setup, service, client, tmp_path):
    """rmgl serve --store milvus: the same hits as the faiss index of the same features;
    items and deletions work, uploads are refused in one line."""
    pytest.importorskip("pymilvus", reason="the milvus store needs pip install 'rmgl[milvus]'")
    from rmgl.deploy.milvus_store import MilvusGallery

    uri = str(tmp_path / "gallery.db")
    try:
        MilvusGallery.build(setup.features, uri, collection="served").close()
    except ValueError as err:
        if "cannot open the Milvus Lite file" in str(err):
            pytest.skip(f"Milvus Lite cannot start here: {err}")
        raise
    settings = ServeSettings(
        index=uri, store="milvus", collection="served", model=setup.checkpoint, device="cpu",
        token=TOKEN,
    )  # fmt: skip
    milvus = GalleryService.open(settings, encoder=service.encoder)
    try:
        other = TestClient(create_app(service=milvus))
        query = image_files([setup.query_images[1]], "image")
        for form in ({"k": "6"}, {"k": "6", "cameras": "1,2"}):
            expected = client.post("/v1/search", files=query, data=form)
            assert hits_of(other.post("/v1/search", files=query, data=form)) == hits_of(expected)
        assert other.get("/v1/gallery/2").json()["id"] == 2
        refused = other.post(
            "/v1/gallery", files=image_files(setup.query_images[:1]), headers=auth()
        )
        assert refused.status_code == 405 and "--crops FOLDER" in refused.json()["error"]
        deleted = other.delete("/v1/gallery?ids=2", headers=auth())
        assert deleted.status_code == 200 and deleted.json()["deleted"] == 1, deleted.text
        assert other.get("/v1/gallery/2").status_code == 404
    finally:
        milvus.close()
    # with a crops folder, uploads work as with an index folder
    settings.crops = tmp_path / "crops"
    milvus = GalleryService.open(settings, encoder=service.encoder)
    try:
        other = TestClient(create_app(service=milvus))
        data = [noise_png(11), noise_png(12)]
        upload = files(("a.png", data[0]), ("b.png", data[1]))
        response = other.post("/v1/gallery", files=upload, data={"camera": "5"}, headers=auth())
        assert response.status_code == 200, response.text
        added = response.json()["added"]
        first = added[0]["id"]
        assert first == milvus.index.count - 2 and added[1]["id"] == first + 1
        for entry, raw in zip(added, data):
            assert (settings.crops / entry["path"]).read_bytes() == raw
            assert other.get(entry["image_url"]).content == raw
        hits = other.post("/v1/search", files=files(("q.png", data[1]), field="image"))
        assert hits.json()["hits"][0]["id"] == first + 1
        assert hits.json()["hits"][0]["distance"] < 1e-3
        assert other.get(f"/v1/gallery/{first}").json()["camid"] == 5
        again = other.post("/v1/gallery", files=files(("c.png", data[0])), headers=auth())
        assert again.status_code == 409 and f"item {first}" in again.json()["error"]
        more = other.post("/v1/gallery", files=files(("d.png", noise_png(13))), headers=auth())
        assert more.json()["added"][0]["id"] == first + 2
        uploads = [s for s in milvus.index.manifest["sources"] if s["folder"] == SOURCE]
        assert len(uploads) == 1 and uploads[0]["count"] == 3  # one entry for the service
        deleted = other.delete(f"/v1/gallery?ids={first}", headers=auth())
        assert deleted.json()["deleted"] == 1
        assert not (settings.crops / added[0]["path"]).exists()  # its image went with it
        assert (settings.crops / added[1]["path"]).exists()
    finally:
        milvus.close()
