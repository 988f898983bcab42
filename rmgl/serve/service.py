"""The gallery search service without HTTP: an encoder, an open index, and the rules a
service needs on top of them (the model check, group commits, limits, one-line errors).

:class:`GalleryService` is what every HTTP route calls, and what a program (or the load
benchmark, measuring the HTTP layer's cost) can call in-process. Its errors are
:class:`rmgl.serve.errors.RequestError` with the HTTP status that describes them.

Concurrency. Searches run in parallel threads; each searches one committed state of the
index (:meth:`rmgl.deploy.index.GalleryIndex.snapshot`) after a ``refresh`` that costs one
``stat`` when nothing changed and moves to another process's newer commit otherwise. The
encoder runs one batch at a time (a model already uses every core). Adds go through one
writer thread per process (:class:`AddQueue`): adds that wait at the same time are
committed together, in one generation, because a commit rewrites the index's faiss file
(time proportional to the gallery); between processes (``--workers``) the index's writer
lock orders the commits.

Examples::

    service = GalleryService.open(ServeSettings(index="gallery.idx", model="best.safetensors"))
    image = decode_image(open("crop.jpg", "rb").read(), "crop.jpg", max_pixels=10**7)
    service.search(service.embed([image])[0], k=5)["hits"][0]["id"]
    service.close()
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rmgl.deploy.features import MODEL_KEYS, descriptor_model, model_differences
from rmgl.deploy.index import (
    DuplicateImageError,
    FeatureRecord,
    GalleryIndex,
    IndexBusyError,
    crop_path,
    is_crop_path,
)
from rmgl.deploy.search import QUERY_MODEL_KEYS, search
from rmgl.deploy.stores import open_store
from rmgl.serve.errors import RequestError
from rmgl.serve.images import FORMATS, OPEN_FORMATS, DecodedImage, media_type
from rmgl.serve.settings import ServeSettings

__all__ = ["SOURCE", "AddQueue", "GalleryService", "parse_time"]

log = logging.getLogger("rmgl.serve")

# the source label of the items a service adds (the manifest's entry, the store's rows)
SOURCE = "rmgl serve uploads"
# images committed together at most (one faiss write)
MAX_GROUP = 512
MAX_SOURCE_LENGTH = 200


def parse_time(value: Any, what: str) -> float:
    """A frame number or time as the index stores it: a number (a frame, or seconds since
    1970 UTC) or an ISO 8601 date with its time zone (``2026-11-26T10:00:00Z``)."""
    if isinstance(value, bool):
        raise RequestError(400, f"{what} must be a number or an ISO 8601 time, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            number = _iso_time(text, what)
    if not math.isfinite(number):
        raise RequestError(400, f"{what} must be finite, got {value!r}")
    return number


def _iso_time(text: str, what: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError(
            400,
            f"{what} {text!r} is neither a number nor an ISO 8601 time "
            "(such as 2026-11-26T10:00:00Z)",
        ) from None
    if moment.tzinfo is None:
        raise RequestError(400, f"{what} {text!r} has no time zone; add one (Z for UTC, or +01:00)")
    return moment.timestamp()


@dataclass
class _PendingAdd:
    features: np.ndarray
    records: list[FeatureRecord]
    crops: dict[str, bytes]
    uploads: list[dict]
    future: Future


class AddQueue:
    """One writer thread: adds that wait at the same time are committed together.

    A commit rewrites the faiss file of the index (its time grows with the gallery), so
    sixteen clients adding one crop each cost one commit, not sixteen. When a group fails
    as a whole (an image that another process added meanwhile, a full disk) each add of
    the group is committed on its own, so every request gets its own answer. ``submit``
    returns a future of (first id, generation).
    """

    def __init__(
        self,
        index: GalleryIndex,
        meta: dict,
        allow_other_model: bool,
        wait: float,
        threads: int | None = None,
    ):
        self.index, self.meta = index, meta
        self.allow_other_model, self.wait, self.threads = allow_other_model, wait, threads
        self._queue: queue.Queue[_PendingAdd | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rmgl-serve-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(
        self, features: np.ndarray, records: list[FeatureRecord], crops: dict, uploads: list[dict]
    ) -> Future:
        future: Future = Future()
        if self._closed:
            future.set_exception(RequestError(503, "the service is shutting down; try again"))
            return future
        self._queue.put(_PendingAdd(features, records, crops, uploads, future))
        return future

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        if self.threads is not None:
            set_threads(self.threads)
        stop = False
        while not stop:
            job = self._queue.get()
            if job is None:
                return
            group, size = [job], len(job.records)
            while size < MAX_GROUP:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                group.append(job)
                size += len(job.records)
            self._commit(group)

    def _commit(self, group: list[_PendingAdd]) -> None:
        try:
            first, _ = self.index.add_arrays(
                np.concatenate([job.features for job in group]),
                [record for job in group for record in job.records],
                {**self.meta, "uploads": [upload for job in group for upload in job.uploads]},
                source=SOURCE,
                crops={path: data for job in group for path, data in job.crops.items()},
                allow_other_model=self.allow_other_model,
                wait=self.wait,
            )
        except Exception as err:  # noqa: BLE001 - handed to the waiting requests
            if len(group) > 1:
                for job in group:  # each on its own: every request gets its own answer
                    self._commit([job])
            else:
                group[0].future.set_exception(err)
            return
        generation = self.index.generation
        for job in group:
            job.future.set_result((first, generation))
            first += len(job.records)


class GalleryService:
    """An open gallery index and the model that made its descriptors (see the module
    docstring). Build one with :meth:`open`; ``close`` it (pending adds are committed)."""

    def __init__(self, settings: ServeSettings, index: GalleryIndex, encoder) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.provenance = encoder.provenance()
        self.model = descriptor_model(self.provenance)
        self._encode_lock = threading.Lock()
        self._writer = AddQueue(
            index,
            self.provenance,
            settings.allow_other_model,
            settings.write_wait,
            settings.threads,
        )
        self.ready = False
        self._closed = False
        self._pinned = threading.local()

    @classmethod
    def open(cls, settings: ServeSettings, encoder=None) -> GalleryService:
        """Load the model (or take ``encoder``), open the index (or create an empty one with
        ``settings.create``), check that the index holds this model's descriptors, and warm
        the model up. Errors are one-line ValueErrors."""
        if settings.threads is not None:
            set_threads(settings.threads)
        if encoder is None:
            from rmgl.deploy.encoder import Encoder

            if not settings.model.is_file():
                raise ValueError(f"model {settings.model} does not exist")
            encoder = Encoder(
                settings.model,
                backend=settings.backend,
                device=settings.device,
                batch_size=settings.batch_size,
            )
        if settings.create and not settings.index.exists():
            index = GalleryIndex.create(settings.index, encoder.provenance())
            log.info("created an empty gallery index %s", settings.index)
        elif settings.store == "faiss":
            index = open_store("faiss", settings.index)
        else:
            options = {"collection": settings.collection, "action": "rmgl serve"}
            if settings.milvus_token:
                options["token"] = settings.milvus_token
            if settings.crops is not None:
                options["crops"] = settings.crops
            index = open_store(settings.store, settings.index, **options)
        try:
            check_model(index, encoder.provenance(), settings)
            service = cls(settings, index, encoder)
        except BaseException:
            index.close()
            raise
        service.warm_up()
        return service

    def warm_up(self) -> None:
        """One encoding and one search, so the first request is not the slow one."""
        blank = Image.new("RGB", (self.encoder.preprocess.width, self.encoder.preprocess.height))
        descriptor = self._encode([blank])[0]
        if self.index.live_count:
            search(self.index, descriptor[None], k=1)
        self.ready = True

    def close(self) -> None:
        """Commit the adds in the queue, then close the index (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        self.ready = False
        self._writer.close()
        self.index.close()

    # ---- reads

    def _pin_threads(self) -> None:
        """``settings.threads`` in the calling thread. OpenMP keeps its thread count per
        thread, and requests run in a pool of threads that do not all inherit the main
        thread's: measured, a pool thread searched with faiss' default two OpenMP threads
        (spinning while torch computed) and took twice as long as the main thread."""
        if self.settings.threads is not None and not getattr(self._pinned, "done", False):
            set_threads(self.settings.threads)
            self._pinned.done = True

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        self._pin_threads()
        with self._encode_lock:
            features = np.asarray(self.encoder.encode(images), dtype=np.float32)
        features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return features

    def embed(self, images: list[DecodedImage]) -> np.ndarray:
        """(N, D) L2-normalised descriptors of decoded uploads, as ``rmgl extract`` makes them."""
        self._check_count(len(images))
        return self._encode([image.image for image in images])

    def info(self) -> dict:
        """What the gallery holds and how the service is set up (the web page reads it)."""
        self.index.refresh()
        view = self.index.snapshot()
        span = view.frame_span()
        return {
            "kind": self.index.kind,
            "dim": self.index.dim,
            "count": view.count,
            "live": view.live_count,
            "deleted": view.deleted_count,
            "generation": view.generation,
            "cameras": view.cameras(),
            "frames": list(span) if span else None,
            "model": {k: v for k, v in self.index.model.items() if k != "model"},
            "writable": self.settings.writable,
            "auth": self.settings.auth,
            "limits": {
                "max_body_bytes": self.settings.max_body_bytes,
                "max_pixels": self.settings.max_pixels,
                "max_images": self.settings.max_images,
                "max_k": self.settings.max_k,
            },
        }

    def search(
        self,
        descriptor: np.ndarray | None = None,
        *,
        item: int | None = None,
        k: int = 10,
        cameras: list[int] | None = None,
        frames: tuple[float | None, float | None] | None = None,
        exclude_same_camera: bool = False,
        pid: int | None = None,
        camera: int | None = None,
        rerank: bool = False,
        rerank_shortlist: int = 100,
        metric: str = "euclidean",
    ) -> dict:
        """The top-k of one query: a descriptor (normalised here) or a gallery item's stored
        descriptor (``item``; its pid and camera serve ``exclude_same_camera``). Hits are
        those of :func:`rmgl.deploy.search.search` (id, path, pid, camid, frame, distance)."""
        if (descriptor is None) == (item is None):
            raise RequestError(400, "give one query: an image, a descriptor or a gallery item")
        if k > self.settings.max_k or (rerank and rerank_shortlist > self.settings.max_k):
            raise RequestError(
                400,
                f"k = {k} (rerank_shortlist {rerank_shortlist}) is more than the limit of "
                f"{self.settings.max_k} (--max-k)",
            )
        self._pin_threads()
        self.index.refresh()
        if item is not None:
            found = self._live_item(item)
            descriptor = self.index.vectors_of([item])[0]
            pid, camera = found.pid, found.camid
        query = self._check_descriptor(descriptor)
        record = FeatureRecord("", pid, camera, None)
        try:
            result = search(
                self.index,
                query[None],
                k,
                query_records=[record],
                cameras=cameras,
                frames=frames,
                exclude_same_camera=exclude_same_camera,
                rerank=rerank,
                rerank_shortlist=rerank_shortlist,
                metric=metric,
            )
        except ValueError as err:
            raise RequestError(400, self._public(str(err))) from None
        return {
            "generation": result.settings["generation"],
            "k": k,
            "metric": metric,
            "query": {"item": item, "pid": pid, "camid": camera},
            "hits": list(result.hits(0)),
            "notes": [self._public(note) for note in result.notes],
        }

    def _check_descriptor(self, descriptor: np.ndarray) -> np.ndarray:
        query = np.asarray(descriptor, dtype=np.float64).reshape(-1)
        if query.shape != (self.index.dim,):
            raise RequestError(
                400,
                f"the descriptor has {query.size} numbers; this gallery's have {self.index.dim}",
            )
        if not np.isfinite(query).all():
            raise RequestError(400, "the descriptor holds a NaN or an infinite number")
        norm = float(np.linalg.norm(query))
        if norm < 1e-12:
            raise RequestError(400, "the descriptor is all zeros (norm 0)")
        return (query / norm).astype(np.float32)

    def _live_item(self, item_id: int):
        view = self.index.snapshot()
        found = view.items([item_id]).get(item_id) if view.is_live(item_id) else None
        if found is None:
            raise RequestError(404, f"there is no gallery item {item_id} (never added, or deleted)")
        return found

    def item(self, item_id: int) -> dict:
        """A live item's metadata and, for an upload, what its client said about it."""
        self.index.refresh()
        found = self._live_item(item_id)
        out = found.to_dict()
        store = getattr(self.index, "store", None)  # the faiss folder's item table
        source = store.source_of(item_id) if store is not None else None
        uploads = (source or {}).get("meta", {}).get("extract", {}).get("uploads")
        if uploads and 0 <= item_id - source["first_id"] < len(uploads):
            out["upload"] = uploads[item_id - source["first_id"]]
        return out

    def image_file(self, item_id: int) -> tuple[Path, str]:
        """(file, media type) of a live item's image: a crop kept in the index folder, or
        the file its feature folder names. Never a path a client chose."""
        self.index.refresh()
        found = self._live_item(item_id)
        # crops live in a faiss index folder, or in a Milvus gallery's crops folder
        folder = getattr(self.index, "path", None) or getattr(self.index, "crops", None)
        crop = folder is not None and is_crop_path(found.path)
        path = folder / found.path if crop else Path(found.path)
        unavailable = RequestError(404, f"the image of gallery item {item_id} is not available")
        try:
            with Image.open(path, formats=OPEN_FORMATS) as image:
                image_format = image.format
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise unavailable from None
        if not path.is_file():
            raise unavailable
        return path, media_type(FORMATS[image_format][0])

    # ---- writes

    def add(
        self,
        images: list[DecodedImage],
        cameras: list[int | None],
        frames: list[float | None],
        pids: list[int | None],
        sources: list[str | None],
    ) -> dict:
        """Embed and add images (one camera, frame or time, pid and source label each; None
        = unknown). Returns their ids once the commit is on disk: a search that starts
        after that finds them, in every worker process."""
        if self.settings.store != "faiss" and self.settings.crops is None:
            raise RequestError(
                405,
                f"this {self.settings.store} gallery takes no uploads: the service has no "
                "folder for their images (rmgl serve --crops FOLDER)",
            )
        self._check_count(len(images))
        for name, values in (("camera", cameras), ("time", frames), ("pid", pids), ("source", sources)):  # fmt: skip
            if len(values) != len(images):
                raise RequestError(400, f"{len(values)} {name} values for {len(images)} images")
        for source in sources:
            if source is not None and len(source) > MAX_SOURCE_LENGTH:
                raise RequestError(400, f"source is longer than {MAX_SOURCE_LENGTH} characters")
        paths = [crop_path(image.data, image.suffix) for image in images]
        seen: dict[str, int] = {}
        for i, path in enumerate(paths):
            if path in seen:
                raise RequestError(400, f"images {seen[path]} and {i} of the request are one file")
            seen[path] = i
        self.index.refresh()
        view = self.index.snapshot()
        if self.settings.store == "faiss":
            already = self.index.store.find_paths(
                paths, below=view.count, generation=view.generation
            )
        else:
            already = self.index.find_paths(paths)
        if already:
            i = min(seen[path] for path in already)
            raise RequestError(
                409,
                f"image {i} ({images[i].name}) is already in the gallery as item "
                f"{already[paths[i]]}; an image is added once",
            )
        features = self.embed(images)
        received = datetime.now(timezone.utc).isoformat(timespec="seconds")
        records = [
            FeatureRecord(path, pid, camera, frame)
            for path, pid, camera, frame in zip(paths, pids, cameras, frames)
        ]
        uploads = [
            {"filename": image.filename, "source": source, "received": received}
            for image, source in zip(images, sources)
        ]
        future = self._writer.submit(
            features, records, {p: image.data for p, image in zip(paths, images)}, uploads
        )
        try:
            first, generation = future.result()
        except RequestError:
            raise
        except DuplicateImageError as err:
            raise RequestError(
                409, f"an image of the request is already in the gallery as item {err.item}"
            ) from None
        except Exception as err:  # noqa: BLE001 - turned into the request's answer
            raise self._write_error(err, "nothing was added") from None
        return {
            "generation": generation,
            "added": [
                {"id": first + i, "path": path, "image_url": f"/v1/gallery/{first + i}/image"}
                for i, path in enumerate(paths)
            ],
        }

    def delete(self, ids: list[int] | None = None, before: float | None = None) -> dict:
        """Delete items by id, or every item whose frame or time is before ``before``
        (retention); their crops go with them. Returns how many were deleted now."""
        if (ids is None) == (before is None):
            raise RequestError(400, "give ids or before (one of them)")
        if ids is not None and not ids:
            raise RequestError(400, "ids is empty")
        try:
            deleted = self.index.delete(ids=ids, before=before, wait=self.settings.write_wait)
        except Exception as err:  # noqa: BLE001
            raise self._write_error(err, "nothing was deleted") from None
        view = self.index.snapshot()
        return {"deleted": deleted, "generation": view.generation, "live": view.live_count}

    def _write_error(self, err: Exception, outcome: str) -> Exception:
        if isinstance(err, IndexBusyError):
            return RequestError(
                503,
                f"another process kept the gallery busy for {self.settings.write_wait:g} s; "
                f"{outcome}, try again",
                {"Retry-After": "5"},
            )
        if isinstance(err, ValueError):
            return RequestError(400, self._public(str(err)))
        if isinstance(err, OSError):
            log.error("writing the gallery failed: %s", err)
            return RequestError(
                503, f"the server could not write the gallery ({self._public(str(err))}); {outcome}"
            )
        return err

    # ---- helpers

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise RequestError(400, "no image in the request (multipart field images)")
        if count > self.settings.max_images:
            raise RequestError(
                413,
                f"{count} images in one request; the limit is {self.settings.max_images} "
                "(--max-images): send them in several requests",
            )

    def _public(self, message: str) -> str:
        """A message for a client: the server's index folder is not named."""
        names = {self.index.location}
        for folder in (getattr(self.index, "path", None), getattr(self.index, "crops", None)):
            if folder is not None:
                names |= {str(folder.resolve()), str(folder)}
        for path in sorted(names, key=len, reverse=True):
            message = message.replace(path, "the gallery")
        return message.splitlines()[0] if message else message


def set_threads(threads: int) -> None:
    """CPU threads of torch and faiss for the work the calling thread starts (OpenMP keeps
    the count per thread)."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def check_model(index: GalleryIndex, provenance: dict, settings: ServeSettings) -> list[str]:
    """Refuse to serve an index whose descriptors come from another model than the one
    loaded (naming both), unless ``settings.allow_other_model``. A read-only service
    allows another precision, as ``rmgl search`` does. Returns what could not be compared."""
    expected, found = index.model, descriptor_model(provenance)
    keys = MODEL_KEYS if settings.writable else QUERY_MODEL_KEYS
    unknown = [key for key in keys if expected.get(key) is None or found.get(key) is None]
    differences = model_differences(expected, found, tuple(k for k in keys if k not in unknown))
    if differences and not settings.allow_other_model:
        raise ValueError(
            f"the index {index.location} holds descriptors of another model than {settings.model} "
            f"({'; '.join(differences)}); serve it with the model its gallery was extracted "
            f"with ({expected.get('model') or 'not recorded'}), or pass --allow-other-model"
        )
    for note in (
        [f"{', '.join(unknown)} of the gallery's model is not recorded; not compared"]
        if unknown
        else []
    ):
        log.warning(note)
    return unknown
