"""Feature extraction on a Ray cluster: ``rmgl extract ... --engine ray``.

The image list is cut into shards of ``shard_size`` consecutive images, a multiple of the
batch size, so that every batch is the one the single-process extractor encodes and the
descriptors are the same numbers. Ray Data feeds the unfinished shards, one per row, to a
pool of encoder actors (``concurrency`` of them, each with ``num_gpus`` GPUs and
``num_cpus`` CPUs, as in Ray's own ``map_batches``). An actor loads the model once and
writes each shard it gets with :func:`rmgl.deploy.extract.extract_to_folder` (unreadable
images listed and skipped, as in one process) into a temporary folder, then renames it to
``FOLDER/shards/<k>``: a shard is whole or absent, and a worker that dies leaves only a
temporary folder, removed when the extraction starts again. Descriptors never travel
through the driver; it receives one small summary per shard, reports progress, and when
every shard is there writes ``failed.csv`` and marks ``extract.json`` complete. The format
(``rmgl-features-v2``) is in :mod:`rmgl.deploy.features`; :func:`read_features` and every
command that reads feature folders read it.

Every node must see the image files, the model file and ``FOLDER`` at the same paths (a
shared file system). Ray is imported only here (``pip install 'rmgl[ray]'``).

Examples::

    from rmgl.deploy import Encoder, read_features, read_image_list
    from rmgl.deploy.distributed import extract_on_ray

    encoder = Encoder("best.safetensors", device="cpu")      # provenance; actors load their own
    meta = extract_on_ray(encoder, read_image_list("crops.csv"), "feats", concurrency=8, num_gpus=1)
    read_features("feats").features.shape
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import rmgl
from rmgl.deploy.encoder import Encoder
from rmgl.deploy.extract import extract_to_folder, extraction_provenance
from rmgl.deploy.features import (
    FAILED,
    FAILED_HEADER,
    FORMAT_SHARDED,
    META,
    SHARDS,
    FeatureWriter,
    read_meta,
    read_sharded_meta,
    shard_folder,
)
from rmgl.deploy.inputs import ImageList, PackedStrings

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'rmgl[ray]'"
SHARD_IMAGES = 4096  # default shard size, rounded up to a multiple of the batch size
# Ray Data restarts a dead actor and gives its shard to a live one; a shard whose worker died
# this often is reported instead (a crash that repeats, e.g. out of memory, would loop)
MAX_ATTEMPTS = 3
CONNECT_SECONDS = 5.0
INPUTS = ".inputs"  # in shards/ while the extraction runs: the image list the actors map
# what a resume must find unchanged (with the image list and the model)
RESUME_KEYS = (
    "input_fingerprint",
    "model_sha256",
    "backend",
    "descriptor_dim",
    "input_size",
    "batch_size",
    "shard_size",
)


def require_ray():
    """Import Ray, or say how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ModuleNotFoundError(
            f"ray is not installed; rmgl extract --engine ray needs it: {INSTALL_HINT}"
        ) from None
    return ray


def extract_on_ray(
    encoder: Encoder,
    images: ImageList,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    amp: str | None = None,
    address: str | None = None,
    concurrency: int = 2,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    shard_size: int | None = None,
    strict: bool = False,
    resume: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the sharded feature folder ``out`` for ``images`` on a Ray cluster.

    ``encoder`` gives the model (its checkpoint or ONNX file, backend, batch size and
    precision; the actors load their own copy on ``device``, ``auto`` = their GPU when
    they have one; ``amp``: their precision, ``off``, ``bf16`` or ``fp16``, default the
    encoder's). ``address``: a running cluster (``host:port`` or ``ray://host:port``);
    None joins the cluster this process is already connected to, or ``RAY_ADDRESS``, or
    starts a local one. ``workers``: image-decoding processes per actor. ``resume``
    continues an unfinished folder made from the same list and model, skipping its finished
    shards. Returns the folder's extract.json.
    """
    out = Path(out)
    if len(images) == 0:
        raise ValueError(f"{images.source} holds no images")
    if concurrency < 1 or num_gpus < 0 or num_cpus <= 0 or workers < 0:
        raise ValueError(
            "--concurrency must be >= 1, --num-gpus >= 0, --num-cpus > 0, --workers >= 0"
        )
    if encoder.source is None:
        raise ValueError(
            "the Ray engine needs a model file the actors can load: an rmgl checkpoint or an "
            "exported ONNX model, not an in-memory model"
        )
    size = shard_size or encoder.batch_size * math.ceil(SHARD_IMAGES / encoder.batch_size)
    if size < 1 or size % encoder.batch_size:
        raise ValueError(
            f"--shard-size {size} must be a multiple of --batch-size {encoder.batch_size}, so "
            "that every batch is the one a single process would encode"
        )
    precision = {"off": "float32", "bf16": "bf16", "fp16": "fp16"}.get(amp or "")
    meta = _start_folder(encoder, images, out, size, resume, precision)
    if meta.get("complete"):
        log.info("%s is already complete (%d descriptors); nothing to do", out, meta["count"])
        return meta
    shards = int(meta["shards"])
    pending = [k for k in range(shards) if not shard_folder(out, k).is_dir()]
    ray = require_ray()
    connect(ray, address)
    check_nodes(ray)
    started = time.perf_counter()
    summaries = _run_shards(
        ray,
        pending,
        images,
        out,
        size,
        progress,
        model=encoder.source,
        backend=encoder.backend,
        device=device,
        batch_size=encoder.batch_size,
        amp=amp or encoder.amp,
        strict=strict,
        workers=workers,
        threads=max(1, int(num_cpus)),
        concurrency=concurrency,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    )
    seconds = time.perf_counter() - started
    done = sum(int(s["inputs"]) for s in summaries)
    return _finish_folder(
        out,
        meta,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        images_per_second=round(done / max(seconds, 1e-9), 1),
        devices=sorted({str(s["device"]) for s in summaries} | set(meta.get("devices", []))),
        hosts=sorted({str(s["host"]) for s in summaries} | set(meta.get("hosts", []))),
    )


# --- the cluster ------------------------------------------------------------------------


def connect(ray, address: str | None) -> None:
    """Join the cluster at ``address`` (None: ``RAY_ADDRESS``, else a new local cluster); a
    process already connected to a cluster keeps that one. An address that does not answer
    is a one-line error after a few seconds instead of Ray's minute of retries."""
    if not ray.is_initialized():
        _init(ray, address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # rmgl reports progress by shard
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # rmgl says what failed, in a line


def _init(ray, address: str | None) -> None:
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), CONNECT_SECONDS):
                pass
        except (OSError, ValueError) as err:
            reason = (err.strerror if isinstance(err, OSError) else None) or str(err)
            raise ConnectionError(
                f"no Ray cluster answers at {address} ({reason}); start one with `ray start "
                "--head` (it prints the address) or give the right --address"
            ) from None
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConnectionError(
            f"could not join the Ray cluster at {address or 'this machine'}: {_first_line(err)}"
        ) from None


def node_versions() -> dict[str, str]:
    """What a node runs: its host name and the rmgl and torch versions it imports."""
    import torch

    return {"host": socket.gethostname(), "rmgl": rmgl.__version__, "torch": torch.__version__}


def check_nodes(ray) -> None:
    """Every alive node of the cluster must run this process's rmgl and torch: another
    version would compute other descriptors (or fail half-way). One task per node, before
    anything is written."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = node_versions()
    probe = ray.remote(num_cpus=0)(node_versions)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote()
        for node in nodes
    ]
    found = []
    for node, ref in zip(nodes, refs):
        try:
            found.append(ray.get(ref))
        except Exception as err:
            raise ValueError(
                f"Ray node {node.get('NodeManagerAddress', node['NodeID'])} cannot run rmgl "
                f"({_root_cause(err)}); install rmgl[ray] with the same torch on every node"
            ) from None
    for node in found:
        for key in ("rmgl", "torch"):
            if node[key] != here[key]:
                raise ValueError(
                    f"Ray node {node['host']} runs {key} {node[key]} but this machine runs "
                    f"{here[key]}; install the same rmgl and torch on every node"
                )


def _run_shards(
    ray,
    pending: list[int],
    images: ImageList,
    out: Path,
    shard_size: int,
    progress: bool,
    concurrency: int,
    num_gpus: float,
    num_cpus: float,
    **actor: Any,
) -> list[dict[str, Any]]:
    """The pending shards through the actor pool; their summaries as they finish."""
    from tqdm import tqdm

    if not pending:
        return []
    save_inputs(images, out / SHARDS / INPUTS)  # the actors map it from the shared folder
    dataset = ray.data.from_items(
        [{"shard": k} for k in pending], override_num_blocks=len(pending)
    ).map_batches(
        ShardWriter,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(concurrency, len(pending))),
        num_gpus=num_gpus or None,
        num_cpus=num_cpus,
        fn_constructor_kwargs={
            "out": str(out),
            "shard_size": shard_size,
            **actor,
        },
    )
    total = sum(min(shard_size, len(images) - k * shard_size) for k in pending)
    summaries = []
    failure: tuple[str, bool] | None = None  # (what, is a bad input)
    with tqdm(total=total, unit="img", desc="extract (ray)", disable=not progress) as bar:
        try:
            for row in dataset.iter_rows():
                if row["error"]:
                    where = f"shard {row['shard']} on {row['host']}"
                    failure = (f"{where}: {row['error']}", bool(row["user_error"]))
                    break
                summaries.append(row)
                bar.update(int(row["inputs"]))
        except Exception as err:  # Ray's own: a worker that died more often than it may
            failure = (_root_cause(err), False)  # restart, a lost node
    if failure is not None:
        reason, user_error = failure
        kept = sum(shard_folder(out, k).is_dir() for k in range(_num_shards(images, shard_size)))
        raise (ValueError if user_error else RuntimeError)(
            f"extraction on Ray stopped: {reason}. The {kept} finished shard(s) in {out} are "
            "kept; fix the cause and run the same command with --resume"
        )
    return summaries


class ShardWriter:
    """The Ray Data actor: loads the model once, then writes each shard it is given.

    A failure is returned as the shard's summary (``error``, and whether it is a bad input)
    rather than raised, so the driver can name it in one line; only a dying process is left
    to Ray, which restarts the actor and gives its shard to a live one.
    """

    def __init__(
        self,
        out: str,
        shard_size: int,
        model: str,
        backend: str,
        device: str,
        batch_size: int,
        amp,
        strict: bool,
        workers: int,
        threads: int,
    ) -> None:
        import torch

        self.out, self.shard_size = Path(out), shard_size
        self.strict, self.workers = strict, workers
        self.error: tuple[str, bool] | None = None
        try:
            torch.set_num_threads(threads)
            self.images = load_inputs(self.out / SHARDS / INPUTS)
            self.encoder = Encoder(
                model, backend=backend, device=device, batch_size=batch_size, amp=amp
            )
        except Exception as err:  # reported with the first shard, see the class docstring
            self.error = _describe(err)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = []
        for shard in (int(k) for k in batch["shard"]):
            try:
                if self.error is not None:
                    raise _Failed(*self.error)
                summaries.append(self.write(shard))
            except Exception as err:
                message, user = err.args if isinstance(err, _Failed) else _describe(err)
                summaries.append(_summary(shard, error=message, user_error=user))
        return {key: np.array([s[key] for s in summaries]) for key in summaries[0]}

    def write(self, shard: int) -> dict[str, Any]:
        final = shard_folder(self.out, shard)
        if not final.is_dir():  # else an earlier attempt finished it
            attempt = _count_attempt(final)
            if attempt > MAX_ATTEMPTS:
                raise _Failed(
                    f"its worker died in each of {attempt - 1} attempts (out of memory? a "
                    "crashing decoder?)",
                    False,
                )
            start = shard * self.shard_size
            stop = min(start + self.shard_size, len(self.images))
            work = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
            try:
                extract_to_folder(
                    self.encoder,
                    slice_images(self.images, start, stop),
                    work,
                    strict=self.strict,
                    workers=self.workers,
                    progress=False,
                )
            except ValueError:
                if not _finish_unreadable_shard(work):
                    raise
            try:
                os.rename(work, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(work, ignore_errors=True)  # a retried attempt finished first
            _fsync_folder(final.parent)
        meta = read_meta(final)
        return _summary(
            shard,
            inputs=int(meta["inputs"]),
            count=int(meta["count"]),
            failed=int(meta["failed"]),
            device=str(self.encoder.device),
        )


def _count_attempt(final: Path) -> int:
    """Which attempt at the shard ``final`` this is, counted in a file beside it (workers
    that die cannot count in memory)."""
    marker = _attempts_file(final)
    try:
        attempt = int(marker.read_text()) + 1
    except (OSError, ValueError):
        attempt = 1
    marker.write_text(str(attempt))
    return attempt


def _attempts_file(final: Path) -> Path:
    return final.with_name(f".{final.name}.attempts")


class _Failed(Exception):
    """A failure already described: (message, is a bad input)."""


def _summary(shard: int, **values: Any) -> dict[str, Any]:
    """One shard's row back to the driver; every row has every key."""
    return {
        "shard": shard,
        "inputs": 0,
        "count": 0,
        "failed": 0,
        "device": "",
        "host": socket.gethostname(),
        "error": "",
        "user_error": False,
        **values,
    }


def _describe(err: BaseException) -> tuple[str, bool]:
    """(one line naming the error, whether it is a bad input rather than a fault)."""
    from rmgl.data.loading import UnreadableImageError

    user = isinstance(err, (ValueError, OSError, UnreadableImageError))
    return f"{type(err).__name__}: {_first_line(err)}", user


def save_inputs(images: ImageList, folder: Path) -> None:
    """The image list as .npy files in ``folder`` (written beside it, then renamed), for the
    actors to map instead of each receiving a copy."""
    work = folder.with_name(f"{folder.name}.{uuid.uuid4().hex}.tmp")
    work.mkdir(parents=True)
    data, ends = images.paths.arrays
    arrays = {"paths": data, "ends": ends, "pids": images.pids}
    arrays.update(camids=images.camids, frames=images.frames)
    for name, array in arrays.items():
        np.save(work / f"{name}.npy", np.ascontiguousarray(array))
    (work / "source.txt").write_text(images.source, encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(work, folder)


def load_inputs(folder: Path) -> ImageList:
    """The image list :func:`save_inputs` wrote, memory-mapped."""
    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        for name in ("paths", "ends", "pids", "camids", "frames")
    }
    return ImageList(
        PackedStrings.from_arrays(arrays["paths"], arrays["ends"]),
        arrays["pids"],
        arrays["camids"],
        arrays["frames"],
        (folder / "source.txt").read_text(encoding="utf-8"),
    )


def slice_images(images: ImageList, start: int, stop: int) -> ImageList:
    """Images ``start .. stop - 1`` of ``images`` as a list of their own."""
    return ImageList(
        PackedStrings(images.paths[i] for i in range(start, stop)),
        images.pids[start:stop],
        images.camids[start:stop],
        images.frames[start:stop],
        f"{images.source}[{start}:{stop}]",
    )


def _finish_unreadable_shard(folder: Path) -> bool:
    """Finish a shard none of whose images could be read (they are in its failed.csv; the
    single-process extractor refuses only a whole list without one readable image); False
    when ``folder`` failed for another reason."""
    try:
        meta = read_meta(folder)
    except (OSError, ValueError):
        return False
    if meta.get("count") != 0 or meta.get("inputs_done") != meta.get("inputs"):
        return False
    FeatureWriter.resume(folder).finish()
    return True


# --- the folder -------------------------------------------------------------------------


def _num_shards(images: ImageList, shard_size: int) -> int:
    return math.ceil(len(images) / shard_size)


def _start_folder(
    encoder: Encoder,
    images: ImageList,
    out: Path,
    shard_size: int,
    resume: bool,
    precision: str | None = None,
) -> dict[str, Any]:
    """The extract.json of a new folder (written), or of the unfinished one ``resume``
    continues (its leftover temporary shards removed)."""
    provenance = extraction_provenance(encoder, images)
    if precision is not None and encoder.backend == "torch":
        provenance["precision"] = precision  # the actors', set apart from the driver's encoder
    meta = {
        "format": FORMAT_SHARDED,
        **provenance,
        "engine": "ray",
        "shard_size": shard_size,
        "shards": _num_shards(images, shard_size),
        "inputs": len(images),
        "count": 0,
        "failed": 0,
        "complete": False,
    }
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the features")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise ValueError(
                f"{out} already holds files; continue an interrupted extraction with --resume, "
                "or give another --out"
            )
        try:
            saved = read_sharded_meta(out)
        except ValueError:
            raise ValueError(
                f"{out} is not a sharded feature folder (rmgl extract --engine ray writes those); "
                "resume it without --engine ray, or give another --out"
            ) from None
        changed = [k for k in (*RESUME_KEYS, "precision") if saved.get(k) != meta.get(k)]
        if changed:
            raise ValueError(
                f"{out} was started with other {' / '.join(changed)}; --resume needs the same "
                "image list, model, --batch-size and --shard-size (use another --out for a new "
                "extraction)"
            )
        for leftover in (out / SHARDS).glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)  # shards a dead worker did not finish
        for counter in (out / SHARDS).glob(".*.attempts"):
            counter.unlink()  # a resume gives every shard its attempts again
        if not saved.get("complete"):
            done = sum(shard_folder(out, k).is_dir() for k in range(int(saved["shards"])))
            log.info("resuming %s: %d of %d shards done", out, done, saved["shards"])
        return saved
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    _write_json(out / META, meta)
    return meta


def _finish_folder(out: Path, meta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Check that every shard is there, gather their unreadable images into failed.csv,
    and mark the folder complete (extract.json last)."""
    count = failed = done = 0
    failed_rows = []
    for shard in range(int(meta["shards"])):
        folder = shard_folder(out, shard)
        saved = read_meta(folder)  # a missing shard fails here
        if not saved.get("complete"):
            raise ValueError(f"{folder} is not complete; run the same command with --resume")
        count += int(saved["count"])
        failed += int(saved["failed"])
        done += int(saved["inputs"])
        if saved["failed"]:
            with open(folder / FAILED, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))[1:]
            offset = shard * int(meta["shard_size"])
            failed_rows += [(int(index) + offset, path, reason) for index, path, reason in rows]
    if done != meta["inputs"]:
        raise ValueError(f"the shards of {out} cover {done} of {meta['inputs']} images")
    for counter in (out / SHARDS).glob(".*.attempts"):
        counter.unlink()
    shutil.rmtree(out / SHARDS / INPUTS, ignore_errors=True)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([FAILED_HEADER, *failed_rows])
    _write_text(out / FAILED, text.getvalue())
    meta = {
        **meta,
        **extra,
        "count": count,
        "failed": failed,
        "inputs_done": done,
        "shards_done": int(meta["shards"]),
        "complete": True,
    }
    _write_json(out / META, meta)
    return meta


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- errors -----------------------------------------------------------------------------


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it wraps: Ray's ``cause``, then ``__cause__`` / ``__context__``."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return chain


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost error that is not Ray's own wrapping."""
    chain = _causes(err)
    own = [e for e in chain if not type(e).__module__.startswith("ray")]
    return _first_line(own[-1] if own else chain[-1])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
