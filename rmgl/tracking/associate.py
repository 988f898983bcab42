"""Cross-camera association: tracklets of all cameras -> global identities.

The rule (docs/tracking.md, "Cross-camera association"):

1. Every tracklet is described by the mean of its boxes' normalised descriptors,
   normalised again; tracklets shorter than ``min_length`` frames stay on their own.
2. Tracklet ``a`` may be followed by tracklet ``b`` when ``b`` starts after ``a`` ends and
   the gap fits: between two cameras, the transit window listed for ``a``'s camera to
   ``b``'s; within one camera, at most ``same_camera_gap`` seconds (a person lost and found
   again). Such a pair is a candidate when the cosine distance of their descriptors is at
   most ``max_distance``.
3. Candidates are taken from the closest pair on (greedy agglomeration, ties in a fixed
   order). Two groups are joined only if the result is still one person's itinerary: its
   tracklets, ordered by time, overlap nowhere and each step to the next fits a window.
4. Each group is one global id, numbered by first appearance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rmgl.tracking.tracker import Tracklet


@dataclass
class AssociationSettings:
    max_distance: float = 0.3  # cosine distance of tracklet descriptors
    same_camera_gap: float = 5.0  # seconds; a person may leave a camera's view and come back
    min_length: int = 3  # frames; shorter tracklets are never joined


def step_allowed(
    a: Tracklet,
    b: Tracklet,
    transit_frames: dict[tuple[str, str], tuple[float, float]],
    same_camera_frames: float,
) -> bool:
    """May the person of ``a`` be the person of ``b`` next?"""
    gap = b.start - a.end
    if gap <= 0:
        return False
    if a.camera == b.camera:
        return gap <= same_camera_frames
    window = transit_frames.get((a.camera, b.camera))
    return window is not None and window[0] <= gap <= window[1]


def associate(
    tracklets: list[Tracklet],
    transit_s: dict[tuple[str, str], tuple[float, float]],
    fps: float,
    settings: AssociationSettings | None = None,
) -> list[int]:
    """The global id (1, 2, ...) of each tracklet, in the order given.

    Examples::

        >>> import numpy as np
        >>> a = Tracklet("cam1", 1, [(1, 0, 0, 10, 20), (5, 0, 0, 10, 20)], np.array([1.0, 0]), 2)
        >>> b = Tracklet("cam2", 1, [(30, 0, 0, 10, 20), (40, 0, 0, 10, 20)], np.array([1.0, 0]), 2)
        >>> c = Tracklet("cam2", 2, [(30, 0, 0, 10, 20), (40, 0, 0, 10, 20)], np.array([0, 1.0]), 2)
        >>> associate([a, b, c], {("cam1", "cam2"): (1.0, 4.0)}, fps=10,
        ...           settings=AssociationSettings(min_length=1))
        [1, 1, 2]
    """
    s = settings or AssociationSettings()
    windows = {k: (lo * fps, hi * fps) for k, (lo, hi) in transit_s.items()}
    same_gap = s.same_camera_gap * fps
    n = len(tracklets)
    vectors = [t.descriptor for t in tracklets]
    usable = [v is not None and len(t.rows) >= s.min_length for t, v in zip(tracklets, vectors)]
    pairs = []
    for i in range(n):
        for j in range(n):
            if i == j or not (usable[i] and usable[j]):
                continue
            if not step_allowed(tracklets[i], tracklets[j], windows, same_gap):
                continue
            distance = 1.0 - float(np.dot(vectors[i], vectors[j]))
            if distance <= s.max_distance:
                pairs.append((distance, i, j))
    pairs.sort()
    group = list(range(n))  # group[i]: the group tracklet i belongs to
    members = {i: [i] for i in range(n)}
    for _, i, j in pairs:
        gi, gj = group[i], group[j]
        if gi == gj:
            continue
        joined = sorted(members[gi] + members[gj], key=lambda k: (tracklets[k].start, k))
        if all(
            step_allowed(tracklets[x], tracklets[y], windows, same_gap)
            for x, y in zip(joined, joined[1:])
        ):
            for k in members[gj]:
                group[k] = gi
            members[gi] = joined
            del members[gj]
    order = sorted(
        members, key=lambda g: min((tracklets[k].start, tracklets[k].camera) for k in members[g])
    )
    number = {g: rank + 1 for rank, g in enumerate(order)}
    return [number[group[i]] for i in range(n)]
