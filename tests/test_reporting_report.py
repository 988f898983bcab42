"""The HTML report (rmgl report, rmgl eval --report, rmgl inspect): its numbers are the
evaluation's, it is self-contained, and bad input gets a one-line error."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from rmgl.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rmgl.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("report_synth")
    generate(
        SynthConfig(
            seed=4,
            train_ids=6,
            test_ids=8,
            distractors=3,
            junk=1,
            cameras_per_id=(2, 3),
            images_per_camera=(2, 2),
        ),
        root,
        workers=1,
        progress=False,
    )
    return root


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """An untrained RMGL-R18 checkpoint in a run folder with a short training log."""
    from rmgl.engine.checkpoint import save_checkpoint
    from rmgl.engine.config import load_config, to_yaml
    from rmgl.model import RMGLConfig, build_model

    run = tmp_path_factory.mktemp("report_run") / "rmgl"
    cfg = load_config("demo", [f"data.root={data}", "data.workers=0", "data.test_batch_size=64"])
    torch.manual_seed(0)
    model = build_model(RMGLConfig(backbone="resnet18", pretrained="none", branches=[2, 3]), 6)
    path = save_checkpoint(run / "best.safetensors", model, to_yaml(cfg), {"num_classes": 6})
    rows = [
        {"epoch": e, "iter": i, "lr": 0.01, "loss": 50.0 - e - i / 4}
        for e in range(1, 3)
        for i in range(4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"epoch": 2, "eval": "plain", "mAP": 0.2, "rank1": 0.25, "mINP": 0.1}]
    (run / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return path


def _report_data(page: str) -> dict:
    found = re.search(
        r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S
    )
    assert found, "the page carries its numbers"
    return json.loads(found.group(1).replace("<\\/", "</"))


def test_report_numbers_are_the_evaluations(data, checkpoint, tmp_path, capsys):
    from rmgl.data.datasets import load_dataset
    from rmgl.engine.evaluation import evaluate_model
    from rmgl.engine.load import load_model

    out = tmp_path / "page.html"
    assert (
        main(
            [
                "report",
                "--checkpoint",
                str(checkpoint),
                "data.dataset=folder",
                f"data.root={data}",
                "--out",
                str(out),
                "--rerank",
                "--worst",
                "3",
                "--topk",
                "5",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert f"report: {out}" in capsys.readouterr().out
    page = out.read_text()
    got = _report_data(page)

    model = load_model(checkpoint, "cpu")
    dataset = load_dataset("folder", data)
    with torch.no_grad():
        expected = evaluate_model(
            model, dataset, model.preprocess.size, rerank=True, workers=0, progress=False
        )
    assert set(got["metrics"]) == {"plain", "rerank"}
    for key, result in expected.items():
        m = got["metrics"][key]
        assert m["mAP"] == pytest.approx(100 * result.mAP)
        assert m["mINP"] == pytest.approx(100 * result.mINP)
        assert m["R1"] == pytest.approx(100 * result.rank(1))
        np.testing.assert_allclose(m["cmc"], result.cmc)
        assert m["valid_queries"] == result.num_valid_queries
        assert m["protocol"] == "cross_camera"
        assert f"<td>{100 * result.mAP:.1f}</td>" in page
    plain = expected["plain"]
    # the AP histogram and the worst queries are the evaluation's per-query numbers
    ap = plain.per_query_ap[~np.isnan(plain.per_query_ap)]
    assert sum(got["ap_histogram"]["counts"]) == len(ap)
    worst = got["worst"]
    assert [w["query"] for w in worst] == sorted(
        range(len(dataset.query)),
        key=lambda q: (
            np.nan_to_num(plain.per_query_ap[q], nan=9),
            -plain.per_query_first_rank[q],
            q,
        ),
    )[:3]
    for w in worst:
        assert w["ap"] == pytest.approx(plain.per_query_ap[w["query"]])
        assert w["first_match_rank"] == plain.per_query_first_rank[w["query"]] + 1
        assert len(w["top"]) == 5
        assert all(m["rank"] > 5 for m in w["missed"])
        assert w["missed_total"] + sum(t["match"] for t in w["top"]) == w["matches_total"]
        assert f"id='q{w['query']}'" in page
    # every section is there; training curves from the run folder; the config and checkpoint
    for section in (
        "sec-metrics",
        "sec-ap",
        "sec-cameras",
        "sec-confused",
        "sec-worst",
        "sec-training",
    ):
        assert f"id={section}" in page
    assert "alt='training curves'" in page and "backbone: resnet18" in page
    assert str(checkpoint.resolve()) in page
    assert (
        page.count("alt='O-2'") == page.count("alt='RP-3'") >= 3
    )  # query and rank-1 of each worst query
    # self-contained: every picture embedded, nothing fetched
    sources = re.findall(r"<img src='([^']*)'", page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)


def test_eval_report_flag_writes_the_same_numbers(data, checkpoint, tmp_path, monkeypatch):
    """`rmgl eval --report --rerank`: the page's numbers are results.json's, and the features
    are extracted once per split and re-ranking runs once, shared by both."""
    from rmgl.engine import evaluation

    calls = {"extract": 0, "rerank": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        evaluation, "extract_features", counted("extract", evaluation.extract_features)
    )
    # the one ranking set-up, shared by the evaluation and the report
    monkeypatch.setattr(
        evaluation, "k_reciprocal_rerank", counted("rerank", evaluation.k_reciprocal_rerank)
    )
    out = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(checkpoint),
                "data.dataset=folder",
                f"data.root={data}",
                "--out",
                str(out),
                "--report",
                "--rerank",
                "--worst",
                "2",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert calls == {"extract": 2, "rerank": 1}
    results = json.loads((out / "results.json").read_text())["results"]
    got = _report_data((out / "report.html").read_text())
    for key in ("plain", "rerank"):
        assert got["metrics"][key]["mAP"] == pytest.approx(100 * results[key]["mAP"])
    assert len(got["worst"]) == 2


def test_inspect_writes_pictures(data, checkpoint, tmp_path, capsys):
    images = sorted(str(p) for p in (data / "query").glob("*.jpg"))[:2]
    assert (
        main(["inspect", "--checkpoint", str(checkpoint), *images, "--out", str(tmp_path / "ins")])
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "ins").iterdir())
    assert names == ["abp.png", "activations.png", "receptive_regions.png"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "report",
                "--checkpoint",
                "{tmp}/missing.safetensors",
                "data.dataset=folder",
                "data.root={data}",
            ],
            "missing.safetensors",
        ),
        (
            ["report", "--checkpoint", "{ck}", "data.dataset=nosuch", "data.root={data}"],
            "unknown dataset 'nosuch'",
        ),
        (
            [
                "report",
                "--checkpoint",
                "{ck}",
                "data.dataset=folder",
                "data.root={data}",
                "--worst",
                "-1",
            ],
            "--worst must be >= 0",
        ),
        (
            [
                "eval",
                "--checkpoint",
                "{ck}",
                "data.dataset=folder",
                "data.root={data}",
                "--report",
                "--topk",
                "0",
            ],
            "--topk >= 1",
        ),
        (["inspect", "--checkpoint", "{ck}", "{tmp}/broken.jpg"], "cannot read image"),
        (["inspect", "--checkpoint", "{ck}", "{tmp}/nothere.jpg"], "nothere.jpg"),
        (["inspect", "--checkpoint", "{tmp}/missing.safetensors", "{img}"], "missing.safetensors"),
        (["inspect", "--checkpoint", "{ck}", "{img}", "--stripes", "0"], "--stripes must be >= 1"),
    ],
)
def test_bad_input_is_one_line(argv, message, data, checkpoint, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    image = next((data / "query").glob("*.jpg"))
    argv = [a.format(tmp=tmp_path, data=data, ck=checkpoint, img=image) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rmgl {argv[0]}: error: ") and message in err, err
    assert "Traceback" not in err


def test_demo_scale_page_is_light(checkpoint, data, tmp_path):
    """A report stays a few hundred kB per detailed query, whatever the dataset size."""
    from rmgl.data.datasets import load_dataset
    from rmgl.engine.failure_report import report_model
    from rmgl.engine.load import load_model

    model = load_model(checkpoint, "cpu")
    path, got, _ = report_model(
        model, load_dataset("folder", data), tmp_path, workers=0, worst=1, progress=False
    )
    assert path == tmp_path / "report.html"
    assert path.stat().st_size < 600_000
    assert set(got["timings"]) == {"features_s", "ranking_s", "analysis_s", "page_s"}


def test_streamed_report_equals_the_matrix_report(checkpoint, data, tmp_path, monkeypatch):
    """Above MATRIX_LIMIT_MB report_model never holds the Q x G matrix; the page is the same."""
    from rmgl.data.datasets import load_dataset
    from rmgl.engine import failure_report
    from rmgl.engine.load import load_model

    model, dataset = load_model(checkpoint, "cpu"), load_dataset("folder", data)
    _, held, _ = failure_report.report_model(
        model, dataset, tmp_path / "a", workers=0, worst=3, progress=False
    )
    monkeypatch.setattr(failure_report, "MATRIX_LIMIT_MB", 0)
    seen = []
    monkeypatch.setattr(
        failure_report, "pairwise_distance", lambda *a, **k: seen.append(a)
    )  # must not run
    _, streamed, _ = failure_report.report_model(
        model, dataset, tmp_path / "b", workers=0, worst=3, progress=False
    )
    assert not seen
    for data_ in (held, streamed):
        data_.pop("timings")
    assert streamed == held


def test_report_renders_in_a_real_browser(data, checkpoint, tmp_path):
    """Headless Chromium opens the report: the screenshot is not blank, every image loads,
    and nothing reaches the console."""
    from browser_support import check_page, find_browser
    from PIL import Image

    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no Chromium binary (chromium, chromium-browser, google-chrome or $RMGL_CHROMIUM): "
            "install Debian's package with `apt-get install -y chromium` (.ci/run does when it can)"
        )
    out = tmp_path / "report.html"
    assert (
        main(
            [
                "report",
                "--checkpoint",
                str(checkpoint),
                "data.dataset=folder",
                f"data.root={data}",
                "--out",
                str(out),
                "--worst",
                "2",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    check = check_page(browser, out, tmp_path / "browser")
    expected_images = out.read_text().count("<img ")
    assert check.images == expected_images > 20
    assert check.broken == [], check.broken
    assert check.errors == [] and check.console == [], (check.errors, check.console)
    with Image.open(check.screenshot) as shot:
        pixels = np.asarray(shot.convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1280)
    assert (
        pixels < 200
    ).mean() > 0.02 and pixels.std() > 20  # text, tables and plots, not a blank page
