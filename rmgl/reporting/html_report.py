"""The failure-analysis report: one self-contained HTML file (every picture embedded, no
script, no network) that shows what a model gets right and where, and why, it fails.

Sections (docs/report.md says how to read each):

1. metrics, plain and re-ranked, with the protocol, and the CMC curves;
2. the per-query AP distribution;
3. rank-1 accuracy per (query camera, gallery camera) pair, and the identity pairs most
   often confused at rank 1;
4. the N worst queries (lowest AP), each with its ranked list (true matches framed green),
   the true matches the list missed with their ranks, the activation maps and ABP stripes of
   the query and of its rank-1 image, and which features put the rank-1 image nearer than
   the best true match;
5. training curves from the run folder's ``metrics.jsonl`` / ``evaluations.jsonl``;
6. the checkpoint and the config the model came from.

The page stays light on large datasets: only the N worst queries are shown in detail, with
small JPEG thumbnails. The numbers come from :func:`rmgl.reporting.analysis.report_data`;
they also go into the page as JSON (``<script type="application/json" id="report-data">``,
data, not code), so that tests and scripts can read them back.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import io
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rmgl.metrics.ranking import RankResult
from rmgl.reporting.analysis import ReportInputs, report_data
from rmgl.reporting.ranked_list import BLUE, GREEN, GREY, RED
from rmgl.reporting.run_logs import read_rows

__all__ = ["ReportInputs", "build_report", "report_data"]

THUMB = (96, 48)  # thumbnail size (H, W) in the ranked lists


# --------------------------------------------------------------------------------- pictures
def _data_uri(picture: Image.Image, kind: str = "JPEG") -> str:
    buffer = io.BytesIO()
    if kind == "JPEG":
        picture.convert("RGB").save(buffer, "JPEG", quality=85)
    else:
        picture.save(buffer, "PNG", optimize=True)
    mime = "jpeg" if kind == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _thumb(
    path: str, border: tuple[int, int, int] | None = None, size: tuple[int, int] = THUMB
) -> str:
    h, w = size
    with Image.open(path) as image:
        picture = image.convert("RGB").resize((w, h), Image.BILINEAR)
    if border is not None:
        ImageDraw.Draw(picture).rectangle([0, 0, w - 1, h - 1], outline=border, width=3)
    return _data_uri(picture)


def _figure_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cmc_plot(results: Mapping[str, RankResult]) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.4))
    for name, result in results.items():
        ranks = np.arange(1, result.max_rank + 1)
        axes.plot(
            ranks,
            100 * result.cmc,
            label=f"{name} (R1 {100 * result.rank(1):.1f}, mAP {100 * result.mAP:.1f})",
        )
    axes.set_xlabel("rank")
    axes.set_ylabel("matching rate (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return _figure_uri(figure)


def _ap_plot(histogram: dict) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.0))
    edges = np.array(histogram["edges"])
    axes.bar(
        edges[:-1],
        histogram["counts"],
        width=np.diff(edges),
        align="edge",
        color="#4a78b5",
        edgecolor="white",
    )
    axes.set_xlabel("average precision of the query")
    axes.set_ylabel("queries")
    axes.set_xlim(0, 1)
    figure.tight_layout()
    return _figure_uri(figure)


def _training_plot(run_dir: Path) -> str | None:
    """Loss per iteration and mAP / rank-1 per evaluation, when the run folder has them."""
    losses = read_rows(run_dir / "metrics.jsonl")  # epochs from 1, older runs' too
    evaluations = read_rows(run_dir / "evaluations.jsonl")
    if not losses and not evaluations:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.0))
    if losses:
        per_epoch: dict[int, int] = {}
        for row in losses:
            per_epoch[row["epoch"]] = max(per_epoch.get(row["epoch"], 0), row.get("iter", 0) + 1)
        # epochs count from 1 in the records: epoch 1 spans x in [0, 1)
        x = [row["epoch"] - 1 + row.get("iter", 0) / per_epoch[row["epoch"]] for row in losses]
        y = np.array([row.get("loss", np.nan) for row in losses], dtype=float)
        axes[0].plot(x, y, color="0.7", linewidth=0.8, label="loss")
        window = max(1, len(y) // 20)
        if window > 1:
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            axes[0].plot(x[window - 1 :], smooth, color="C0", label=f"mean of {window}")
        axes[0].set_xlabel("epoch")
        axes[0].set_title("training loss", fontsize=9)
        axes[0].legend(fontsize=7)
    for key in sorted({row.get("eval", "plain") for row in evaluations}):
        rows = [r for r in evaluations if r.get("eval", "plain") == key]
        epochs = [r["epoch"] for r in rows]
        axes[1].plot(epochs, [100 * r["mAP"] for r in rows], marker="o", label=f"mAP {key}")
        axes[1].plot(
            epochs, [100 * r["rank1"] for r in rows], marker="s", linestyle="--", label=f"R1 {key}"
        )
    axes[1].set_xlabel("epoch")
    axes[1].set_title("evaluations (%)", fontsize=9)
    if evaluations:
        axes[1].legend(fontsize=7)
    figure.tight_layout()
    return _figure_uri(figure)


# ------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.muted{color:#777;font-size:12px}.row{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:11px}figure img{display:block;margin:0 auto}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 12px;margin:14px 0}
.sep{width:14px}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:420px}
nav a{margin-right:12px}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _metrics_html(data: dict) -> str:
    columns = ("R1", "R5", "R10", "mAP", "mINP")
    rows = "".join(
        f"<tr><td class=l>{_esc(key)}</td>"
        + "".join(f"<td>{_pct(m[c])}</td>" for c in columns)
        + f"<td>{m['valid_queries']}</td><td>{m['skipped_queries']}</td></tr>"
        for key, m in data["metrics"].items()
    )
    head = "".join(f"<th>{c} (%)</th>" for c in columns)
    return f"<table id=metrics><tr><th class=l>ranking</th>{head}<th>queries</th><th>skipped</th></tr>{rows}</table>"


def _camera_html(cams: dict) -> str:
    cells = []
    for a, row in enumerate(cams["r1"]):
        tds = []
        for b, value in enumerate(row):
            n = cams["queries"][a][b]
            if value is None:
                tds.append(
                    "<td style='background:#eee' title='no query with a true match here'>–</td>"
                )
            else:
                # red below 50 %, green above, deeper the farther from 50 %
                shade = int(255 - 220 * abs(value - 0.5))
                colour = f"rgb(255,{shade},{shade})" if value < 0.5 else f"rgb({shade},255,{shade})"
                tds.append(
                    f"<td style='background:{colour}' title='{n} queries'>{100 * value:.0f}</td>"
                )
        cells.append(f"<tr><th>c{cams['cameras'][a]}</th>{''.join(tds)}</tr>")
    head = "".join(f"<th>c{c}</th>" for c in cams["cameras"])
    return f"<table id=camera-r1><tr><th>query \\ gallery</th>{head}</tr>{''.join(cells)}</table>"


def _tile(uri: str, caption: str, title: str = "") -> str:
    return (
        f"<figure title='{_esc(title)}'><img src='{uri}' alt='{_esc(caption)}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _feature_breakdown(inputs: ReportInputs, q: int, impostor: int, match: int) -> str:
    """Per feature, its part of the squared distance from the query to the rank-1 image and
    to the best true match; the features where the impostor is nearer are marked."""
    qf, gf, names = inputs.query_features, inputs.gallery_features, list(inputs.feature_names)
    if qf is None or gf is None or not names or impostor < 0 or match < 0:
        return ""
    parts = len(names)
    if qf.shape[1] % parts:
        return ""
    to_impostor = ((qf[q] - gf[impostor]) ** 2).reshape(parts, -1).sum(1)
    to_match = ((qf[q] - gf[match]) ** 2).reshape(parts, -1).sum(1)
    rows = "".join(
        f"<tr{' style=background:#fde2e2' if a < b else ''}><td class=l>{_esc(n)}</td><td>{a:.3f}</td><td>{b:.3f}</td></tr>"
        for n, a, b in zip(names, to_impostor, to_match, strict=True)
    )
    fooled = int((to_impostor < to_match).sum())
    return (
        f"<details><summary>per-feature squared distance: {fooled} of {parts} features put the rank-1 "
        f"image nearer than the best true match (red rows)</summary><table><tr><th class=l>feature</th>"
        f"<th>to rank-1</th><th>to best true match</th></tr>{rows}<tr><td class=l>total</td>"
        f"<td>{to_impostor.sum():.3f}</td><td>{to_match.sum():.3f}</td></tr></table></details>"
    )


def _inspection_html(inputs: ReportInputs, rows: list[dict]) -> dict[int, str]:
    """Activation maps and ABP stripes of each worst query and of its rank-1 image."""
    model = inputs.model
    if model is None or not rows:
        return {}
    from rmgl.reporting.inspection import abp_card, activation_panels, inspect_images

    paths, owners = [], []
    for i, row in enumerate(rows):
        paths.append(row["path"])
        owners.append((i, "query"))
        if row["rank1"] >= 0:
            paths.append(inputs.gallery[row["rank1"]].path)
            owners.append(
                (i, "rank-1" + (" (true match)" if row["top"] and row["top"][0]["match"] else ""))
            )
    inspections = inspect_images(model, paths)
    out: dict[int, list[str]] = {}
    for (i, label), insp in zip(owners, inspections, strict=True):
        scale = 2 if insp.image.shape[0] < 200 else 1
        tiles = [
            _tile(_data_uri(pic), _esc(caption)) for caption, pic in activation_panels(insp, scale)
        ]
        cards = [
            _tile(
                _data_uri(abp_card(insp, b, scale)),
                f"{_esc(view.name)} ABP · votes {' '.join(map(str, view.votes.tolist()))}",
                "left: image, middle: final map; dashed white: uniform stripes, magenta: ABP stripes; bars: votes per row",
            )
            for b, view in enumerate(insp.branches)
            if view.stripes > 1
        ]
        out.setdefault(i, []).append(
            f"<div class=row><div style='width:90px;font-size:12px'><b>{_esc(label)}</b></div>{''.join(tiles)}"
            f"<div class=sep></div>{''.join(cards)}</div>"
        )
    return {i: "".join(parts) for i, parts in out.items()}


def _worst_html(inputs: ReportInputs, data: dict, topk: int) -> str:
    pictures = _inspection_html(inputs, data["worst"])
    blocks = []
    for i, row in enumerate(data["worst"]):
        q = row["query"]
        tiles = [_tile(_thumb(row["path"], BLUE), f"query<br>id {row['pid']} c{row['camera'] + 1}")]
        tiles.append("<div class=sep></div>")
        for rank, item in enumerate(row["top"], start=1):
            border = GREEN if item["match"] else RED
            pid = "distractor" if item["pid"] == 0 else f"id {item['pid']}"
            tiles.append(
                _tile(
                    _thumb(inputs.gallery[item["gallery"]].path, border),
                    f"{rank}: {item['distance']:.3f}<br>{pid} c{item['camera'] + 1}",
                )
            )
        missed = ""
        if row["missed"]:
            more = row["missed_total"] - len(row["missed"])
            missed_tiles = "".join(
                _tile(
                    _thumb(inputs.gallery[m["gallery"]].path, GREY),
                    f"rank {m['rank']}<br>{m['distance']:.3f}",
                )
                for m in row["missed"]
            )
            missed = (
                f"<div class=muted>true matches outside the top {topk}"
                f"{f' (and {more} more)' if more > 0 else ''}:</div><div class=row>{missed_tiles}</div>"
            )
        breakdown = ""
        if row["top"] and not row["top"][0]["match"]:
            breakdown = _feature_breakdown(inputs, q, row["rank1"], row["best_match"])
        blocks.append(
            f"<div class=card id='q{q}'><h3>#{i + 1} · query {q} (id {row['pid']}, camera {row['camera'] + 1}) · "
            f"AP {100 * row['ap']:.1f} · the first of its {row['matches_total']} true matches at rank "
            f"{row['first_match_rank']}</h3><div class=muted>{_esc(row['path'])}</div>"
            f"<div class=row>{''.join(tiles)}</div>{missed}{pictures.get(i, '')}{breakdown}</div>"
        )
    return "".join(blocks)


def _confused_html(inputs: ReportInputs, data: dict) -> str:
    if not data["confused_pairs"]:
        return "<p>No query has another identity at rank 1.</p>"
    rows = []
    for p in data["confused_pairs"]:
        example, rank1 = p["examples"][0], p["example_rank1"][0]
        images = _tile(_thumb(inputs.query[example].path, None, (64, 32)), f"q {example}")
        images += _tile(_thumb(inputs.gallery[rank1].path, RED, (64, 32)), "rank 1")
        rows.append(
            f"<tr><td>{p['a']}</td><td>{p['b']}</td><td>{p['count']}</td><td>{p['a_to_b']}</td>"
            f"<td>{p['b_to_a']}</td><td class=l>{', '.join(map(str, p['examples']))}</td>"
            f"<td><div class=row>{images}</div></td></tr>"
        )
    return (
        "<table id=confused><tr><th>id a</th><th>id b</th><th>rank-1 confusions</th><th>a→b</th><th>b→a</th>"
        f"<th class=l>example queries</th><th>query</th></tr>{''.join(rows)}</table>"
    )


def _provenance_html(inputs: ReportInputs) -> str:
    parts = []
    if inputs.checkpoint:
        path = Path(inputs.checkpoint)
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            stat = path.stat()
            modified = datetime.datetime.fromtimestamp(stat.st_mtime).isoformat(timespec="seconds")
            parts.append(
                f"<p>checkpoint <code>{_esc(path.resolve())}</code>, {stat.st_size / 2**20:.1f} MiB, "
                f"modified {modified}, sha256 <code>{digest.hexdigest()[:16]}</code></p>"
            )
        else:
            parts.append(f"<p>checkpoint <code>{_esc(path)}</code></p>")
    if inputs.config_yaml:
        parts.append(
            f"<details open><summary>config</summary><pre>{_esc(inputs.config_yaml)}</pre></details>"
        )
    return "".join(parts) or "<p>not recorded</p>"


def render_html(inputs: ReportInputs, data: dict, topk: int) -> str:
    plain = inputs.results["plain"]
    title = f"rmgl report · {inputs.dataset}"
    hist = data["ap_histogram"]
    low = sum(hist["counts"][:5])
    run_dir = Path(inputs.run_dir) if inputs.run_dir else None
    curves = _training_plot(run_dir) if run_dir is not None else None
    sections = [
        f"<h1>{_esc(title)}</h1>",
        f"<p class=muted>{data['num_query']} queries, {data['num_gallery']} gallery images"
        f"{f' from {_esc(inputs.root)}' if inputs.root else ''}; protocol <b>{_esc(inputs.protocol)}</b>, "
        f"distance {_esc(inputs.metric)}; built {datetime.datetime.now().isoformat(timespec='seconds')}</p>",
        "<nav><a href='#sec-metrics'>metrics</a><a href='#sec-ap'>AP distribution</a><a href='#sec-cameras'>cameras</a>"
        "<a href='#sec-confused'>confused identities</a><a href='#sec-worst'>worst queries</a>"
        "<a href='#sec-training'>training</a><a href='#sec-provenance'>provenance</a></nav>",
        "<h2 id=sec-metrics>Metrics</h2>",
        _metrics_html(data),
        "<p class=muted>" + _esc(_protocol_note(inputs.protocol)) + "</p>",
        _tile(_cmc_plot(inputs.results), "CMC"),
        "<h2 id=sec-ap>Per-query AP</h2>",
        f"<p>Median AP {_pct(100 * hist['median'] if hist['median'] is not None else None)} %, "
        f"{low} of {plain.num_valid_queries} queries below 50 %; {data['rank1_wrong']} queries have a wrong "
        f"identity at rank 1.</p>",
        _tile(_ap_plot(hist), "AP per query (plain ranking)"),
        "<h2 id=sec-cameras>Rank-1 per camera pair</h2>",
        "<p class=muted>Row: the query's camera; column: a gallery camera. A cell is the rank-1 accuracy when "
        "only that camera's gallery images are ranked, over the queries that have a true match there "
        "(hover for their number). – : no such query.</p>",
        _camera_html(data["camera_pairs"]),
        "<h2 id=sec-confused>Identities most often confused</h2>",
        f"<p class=muted>Pairs of identities where a query of one has an image of the other at rank 1 "
        f"(plain ranking). {data['rank1_distractors']} queries have a distractor at rank 1.</p>",
        _confused_html(inputs, data),
        f"<h2 id=sec-worst>The {len(data['worst'])} worst queries</h2>",
        "<p class=muted>Lowest AP first. Frames: blue query, green true match, red other identity, grey a true "
        "match below the list (with its rank). Activation maps (docs/report.md): O-K original path, RP-K "
        "receptive-partitioned path of the K-stripe branch; ABP cards: dashed white uniform stripes, magenta "
        "ABP stripes, bars the votes per row.</p>",
        _worst_html(inputs, data, topk),
        "<h2 id=sec-training>Training</h2>",
        _tile(curves, "training curves")
        if curves
        else "<p>No run folder with metrics.jsonl beside the checkpoint.</p>",
        "<h2 id=sec-provenance>Provenance</h2>",
        _provenance_html(inputs),
        f"<script type='application/json' id='report-data'>{_json_for_html(data)}</script>",
    ]
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>"
        f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def _protocol_note(protocol: str) -> str:
    if protocol == "cross_camera":
        return (
            "cross_camera: gallery images of the query's identity from the query's camera are ignored "
            "(the standard Market-1501 / DukeMTMC-reID / MSMT17 protocol)."
        )
    return (
        "any_camera: only the query image itself is ignored; not comparable with published "
        "cross-camera numbers."
    )


def _json_for_html(data: dict) -> str:
    # "</" would end the script element; JSON allows the escaped form
    return json.dumps(data, allow_nan=False).replace("</", "<\\/")


def build_report(
    out: str | Path, inputs: ReportInputs, worst: int = 20, topk: int = 10, confused: int = 15
) -> tuple[Path, dict]:
    """Write the report to ``out`` (an .html file, or a folder that gets ``report.html``);
    returns its path and the numbers it shows (with ``timings`` in seconds)."""
    if worst < 0 or topk < 1:
        raise ValueError(f"worst must be >= 0 and topk >= 1, got {worst} and {topk}")
    start = time.perf_counter()
    path = Path(out)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = report_data(inputs, worst, topk, confused)
    analysed = time.perf_counter()
    page = render_html(inputs, data, topk)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    data["timings"] = {
        **inputs.timings,
        "analysis_s": analysed - start,
        "page_s": time.perf_counter() - analysed,
    }
    return path, data
