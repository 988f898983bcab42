"""Query and gallery for data that has only training identities: a seeded share of the
identities is held out, and the split is written as a CSV list (the ``csv`` dataset format)
so that it can be read back, inspected and reused.

Examples::

    from rmgl.data.datasets import load_dataset
    from rmgl.data.holdout import hold_out_identities, write_split_csv

    train_only = load_dataset("identity_folders", "my_people")      # no query/ or gallery/
    dataset = hold_out_identities(train_only, fraction=0.2, seed=0)
    write_split_csv(dataset, "runs/mine/split.csv")                   # data.dataset=csv reads it
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from pathlib import Path

from rmgl.data.records import ImageRecord, ReidDataset, relabel

MIN_TRAIN_IDS = 2


def hold_out_identities(dataset: ReidDataset, fraction: float, seed: int) -> ReidDataset:
    """``dataset`` (training identities only) with ``fraction`` of its identities moved to
    query and gallery: for each held-out identity, one image is the query and the others are
    its gallery. Only identities with two or more images (seen by two or more cameras, when
    the data has cameras) can be held out; the others stay in training. The same ``seed``
    gives the same split."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.holdout_ids must be in (0, 1), got {fraction}")
    cross_camera = dataset.protocol == "cross_camera"
    by_pid: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in dataset.train:
        by_pid[record.pid].append(record)
    eligible = [
        pid
        for pid, records in sorted(by_pid.items())
        if len(records) >= 2 and (not cross_camera or len({r.camid for r in records}) >= 2)
    ]
    wanted = max(2, round(fraction * len(by_pid)))
    if len(eligible) < 2 or len(by_pid) - min(wanted, len(eligible)) < MIN_TRAIN_IDS:
        need = "two images from two cameras" if cross_camera else "two images"
        raise ValueError(
            f"{dataset.root} has only training identities, and too few to hold some out for "
            f"evaluation ({len(by_pid)} identities, {len(eligible)} with {need}); add query/ "
            "and gallery/ (docs/own-data.md) or more identities"
        )
    rng = random.Random(seed)
    held = sorted(rng.sample(eligible, min(wanted, len(eligible))))
    query, gallery = [], []
    for pid in held:
        records = by_pid[pid]
        if cross_camera:  # a query whose identity the gallery shows from another camera
            camera = rng.choice(sorted({r.camid for r in records}))
            first = rng.choice([r for r in records if r.camid == camera])
        else:
            first = rng.choice(records)
        # identities of the test splits from 1: pid 0 means "distractor" to the readers
        query.append(ImageRecord(first.path, pid + 1, first.camid))
        gallery.extend(ImageRecord(r.path, pid + 1, r.camid) for r in records if r is not first)
    held_set = set(held)
    train = relabel([r for r in dataset.train if r.pid not in held_set])
    note = (
        f"only training identities: {len(held)} of {len(by_pid)} held out as query and "
        f"gallery (share {fraction:g}, seed {seed})"
    )
    return ReidDataset(
        dataset.name,
        train=train,
        query=query,
        gallery=gallery,
        root=dataset.root,
        notes=[*dataset.notes, note],
        protocol=dataset.protocol,
    )


def write_split_csv(dataset: ReidDataset, path: str | Path) -> Path:
    """``path,pid,camid,split`` rows (identities from 1, as the ``csv`` format counts them),
    written to a temporary file and renamed: never half written. Data without cameras
    (``any_camera``) is written without the ``camid`` column, so that it reads back with the
    same protocol."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train_ids = {pid: i + 1 for i, pid in enumerate(sorted({r.pid for r in dataset.train}))}
    test_ids = sorted({r.pid for r in [*dataset.query, *dataset.gallery]})
    test_ids_map = {pid: len(train_ids) + i + 1 for i, pid in enumerate(test_ids)}
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        cameras = dataset.protocol != "any_camera"
        writer.writerow(["path", "pid", "camid", "split"] if cameras else ["path", "pid", "split"])
        for split, records, ids in (
            ("train", dataset.train, train_ids),
            ("query", dataset.query, test_ids_map),
            ("gallery", dataset.gallery, test_ids_map),
        ):
            for r in records:
                camid = [r.camid] if cameras else []
                writer.writerow([os.path.abspath(r.path), ids[r.pid], *camid, split])
    os.replace(temporary, path)
    return path
