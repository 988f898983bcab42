"""MOT metrics with motmetrics: per-camera MOTA, IDF1, ID switches; cross-camera IDF1.

Cross-camera IDF1 is the multi-camera IDF1 of the DukeMTMC protocol: all cameras are laid
end to end as one sequence and ground-truth and predicted *global* ids are matched once for
the whole set, so a person who keeps one id in every camera counts fully, and one who gets a
new id in each camera counts only where the best matching id was.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

METRICS = ("mota", "idf1", "num_switches", "num_false_positives", "num_misses", "num_frames")


def require_motmetrics():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import motmetrics
    except ImportError:
        raise ModuleNotFoundError(
            "motmetrics is not installed; rmgl track-eval needs it: pip install 'rmgl[track]'"
        ) from None
    return motmetrics


def _by_frame(rows: list[tuple]) -> dict[int, tuple[list[int], np.ndarray]]:
    out: dict[int, list] = {}
    for frame, pid, *box in rows:
        out.setdefault(frame, []).append((pid, box))
    return {
        f: ([p for p, _ in items], np.asarray([b for _, b in items], dtype=np.float64))
        for f, items in out.items()
    }


def iou_distances(mm, objs: np.ndarray, hyps: np.ndarray, max_distance: float) -> np.ndarray:
    """``motmetrics.distances.iou_matrix`` (1 - IoU, NaN beyond ``max_distance``) on the library's
    own ``boxiou``: ``iou_matrix`` itself calls ``np.asfarray``, which numpy 2 removed."""
    if objs.size == 0 or hyps.size == 0:
        return np.empty((0, 0))
    distance = 1.0 - mm.distances.boxiou(objs[:, None], hyps[None, :])
    return np.where(distance > max_distance, np.nan, distance)


def accumulate(
    acc, gt: list[tuple], hyp: list[tuple], frames: int, offset: int = 0, iou: float = 0.5
):
    """Add one camera's frames to a motmetrics accumulator (a match needs IoU >= ``iou``)."""
    mm = require_motmetrics()
    gt_f, hyp_f = _by_frame(gt), _by_frame(hyp)
    empty = ([], np.zeros((0, 4)))
    for frame in range(1, frames + 1):
        gids, gboxes = gt_f.get(frame, empty)
        hids, hboxes = hyp_f.get(frame, empty)
        distances = iou_distances(mm, gboxes, hboxes, 1.0 - iou)
        acc.update(gids, hids, distances, frameid=offset + frame)


def evaluate(cameras: dict[str, tuple[list[tuple], list[tuple], int]], iou: float = 0.5) -> dict:
    """``{camera: (gt rows, result rows, frame count)}`` -> metrics.

    Rows are ``(frame, id, left, top, width, height)``. Returns ``{"cameras": {name: {metric:
    value}}, "overall": {...}, "cross_camera_idf1": float}``; ``overall`` pools the per-camera
    events (motmetrics' "OVERALL" row).
    """
    mm = require_motmetrics()
    accs, names = [], []
    joint = mm.MOTAccumulator(auto_id=False)
    offset = 0
    for name, (gt, hyp, frames) in cameras.items():
        acc = mm.MOTAccumulator(auto_id=False)
        accumulate(acc, gt, hyp, frames, iou=iou)
        accumulate(joint, gt, hyp, frames, offset=offset, iou=iou)
        offset += frames
        accs.append(acc)
        names.append(name)
    host = mm.metrics.create()
    logging.disable(logging.INFO)  # motmetrics logs its timings on the root logger
    try:
        summary = host.compute_many(accs, names=names, metrics=list(METRICS), generate_overall=True)
        joint_idf1 = host.compute(joint, metrics=["idf1"], name="all")
    finally:
        logging.disable(logging.NOTSET)
    rows = {name: {k: _number(summary.loc[name, k]) for k in METRICS} for name in summary.index}
    overall = rows.pop("OVERALL")
    return {
        "cameras": rows,
        "overall": overall,
        "cross_camera_idf1": _number(joint_idf1.loc["all", "idf1"]),
    }


def _number(value) -> float | int:
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, (int, np.integer)) else float(value)
