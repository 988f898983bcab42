"""Descriptors of any images with a trained model: the numbers ``rmgl eval`` computes.

Two backends, one preprocessing:

* ``torch``: the rmgl model (a checkpoint or ``load_model``'s model). Every batch goes through
  :func:`rmgl.metrics.extract_features`, the evaluation's own code (true float32 unless
  ``amp`` asks for less: TF32 off), so a batch gives the same bits as ``rmgl eval`` on the
  same images in the same batch (CPU kernels may round a batch of another size differently
  in the last bits, ~1e-6).
* ``onnxruntime``: a file written by ``rmgl export --format onnx`` and its sidecar JSON; no
  rmgl checkpoint and no model code. Flip-averaging and L2 normalisation are inside the graph.
  The CUDA provider runs with TF32 off (``use_tf32=0``; onnxruntime's default is on).
  A raw-pixel export (``rmgl export --pixels uint8|float255``; sidecar ``"pixels"``) is
  fed the resized 0-255 pixels instead of prepared inputs, so every variant gives the same
  descriptors.

Images are prepared by :meth:`rmgl.engine.load.Preprocess.transform`, the evaluation
transform, after being turned into the (3, H, W) uint8 RGB tensor that
:func:`rmgl.data.loading.read_image` makes of a file.

Examples::

    from rmgl.deploy import Encoder

    encoder = Encoder("runs/demo/rmgl/best.safetensors", device="cpu")
    features = encoder.encode(["a.jpg", "b.jpg"])          # (2, 3584) float32, rows of norm 1
    similarity = features @ features.T

    onnx = Encoder("model.onnx", backend="onnxruntime")    # model.json must lie beside it
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from rmgl.data.loading import read_image
from rmgl.deploy.features import read_format_json
from rmgl.deploy.files import sha256_file
from rmgl.engine.load import Preprocess, load_model
from rmgl.engine.runtime import amp_dtype, resolve_device
from rmgl.metrics.features import extract_features

BACKENDS = ("torch", "onnxruntime")
# "auto": onnxruntime for an .onnx path, torch for a checkpoint or a loaded model
BACKEND_CHOICES = ("auto", *BACKENDS)
SIDECAR_FORMAT = "rmgl-onnx-v1"
# What an exported graph takes (the sidecar's "pixels"; files without it are "normalized"):
# prepared inputs, or raw RGB pixels 0-255 at the model's size with the normalisation inside
PIXEL_VARIANTS = ("normalized", "uint8", "float255")
INSTALL_HINT = "pip install 'rmgl[deploy]'"

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def require(module: str) -> Any:
    """Import an optional dependency of the deploy extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(
            f"{module} is not installed; ONNX export and the onnxruntime backend need it: "
            f"{INSTALL_HINT}"
        ) from None


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """Where the sidecar of an exported model lies: ``model.onnx`` -> ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | os.PathLike) -> dict:
    """The sidecar JSON of an exported ``.onnx`` file, checked; a sidecar that records the
    SHA-256 of its model (``onnx_sha256``, written by every export) must match the file, so
    a model is never run with another model's sidecar."""
    path = sidecar_path(onnx_path)
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"{onnx_path} has no sidecar {path}: the input size, normalisation and descriptor "
            "layout come from it; export with rmgl export --format onnx, which writes both"
        )
    meta = read_format_json(path, SIDECAR_FORMAT, "an rmgl ONNX sidecar")
    recorded = meta.get("onnx_sha256")
    if recorded is not None and recorded != sha256_file(onnx_path):
        raise ValueError(
            f"{path} describes another model than {onnx_path} (its onnx_sha256 differs): the "
            "two files do not belong together (an interrupted export, or a copied file); "
            "export again with rmgl export --format onnx"
        )
    return meta


def prepare_file(path: str | os.PathLike, transform) -> torch.Tensor:
    """A file as the evaluation prepares it: decoded to uint8 RGB, then ``transform``."""
    return transform(read_image(os.fspath(path)))


class Encoder:
    """Flip-averaged, L2-normalised descriptors of images, in batches.

    ``model_or_checkpoint``: an rmgl checkpoint path or :func:`rmgl.load_model`'s model
    (torch backend), or an exported ``.onnx`` path (onnxruntime backend; ``onnx_path`` says the
    same). ``backend``: ``auto`` (the default) picks onnxruntime for an ``.onnx`` file and torch
    otherwise; ``torch`` or ``onnxruntime`` say it explicitly. ``device``: ``auto`` (GPU when there is one), ``cpu``, ``cuda[:N]``. ``amp``: None
    (float32, what ``rmgl eval`` uses by default), ``"bf16"``, ``"fp16"`` (GPU) or a torch
    dtype; torch backend only, reduced precision moves ABP boundaries. ``threads``: onnxruntime's
    CPU threads (default: one per core); torch's are process-wide (``torch.set_num_threads``).

    Accepted images (:meth:`encode`, :meth:`prepare`):

    * a path: read like the evaluation reads files (:func:`rmgl.data.loading.read_image`);
    * a PIL image: converted to RGB;
    * a numpy array H x W x 3 uint8, RGB (``bgr=True``: OpenCV's BGR order);
    * a torch tensor 3 x H x W: uint8 is a raw RGB image (``bgr=True`` as for arrays),
      resized and normalised like a file; float32 is an *already prepared* input (the output
      of ``encoder.preprocess.transform()``: model size, normalised with the model's mean
      and std), used as is.

    Examples::

        encoder = Encoder("best.safetensors", device="cpu", batch_size=32)
        encoder.descriptor_dim                      # 3584
        encoder.encode(["a.jpg", pil_image, cv2.imread("b.jpg")])   # mixing kinds is fine...
        encoder.encode([cv2.imread("b.jpg")], bgr=True)            # ...but bgr is per call
    """

    def __init__(
        self,
        model_or_checkpoint: Any = None,
        backend: str = "auto",
        device: str | torch.device = "auto",
        batch_size: int = 64,
        amp: str | torch.dtype | None = None,
        onnx_path: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        if backend not in BACKEND_CHOICES:
            raise ValueError(
                f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}"
            )
        if backend == "auto":
            backend = _auto_backend(model_or_checkpoint, onnx_path)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.batch_size = batch_size
        if backend == "torch":
            if onnx_path is not None:
                raise ValueError(
                    "onnx_path is for backend='onnxruntime'; the torch backend runs the checkpoint"
                )
            self._init_torch(model_or_checkpoint, device, amp)
        else:
            if amp not in (None, "off", "auto"):
                raise ValueError(
                    "amp is a torch-backend setting; for a half-precision ONNX model export one with "
                    "rmgl export --format onnx --fp16"
                )
            path = onnx_path if onnx_path is not None else model_or_checkpoint
            if onnx_path is not None and model_or_checkpoint is not None:
                raise ValueError("give the ONNX file once: as model_or_checkpoint or as onnx_path")
            if not isinstance(path, (str, os.PathLike)):
                raise ValueError("backend='onnxruntime' needs the path of an exported .onnx file")
            self._init_onnxruntime(Path(path), device, threads)
        self._transform = self.preprocess.transform()
        self._provenance: dict[str, Any] | None = None

    def provenance(self) -> dict[str, Any]:
        """What produced this encoder's descriptors, as ``extract.json`` records it: the model
        file and its SHA-256 (for an ONNX model also the SHA-256 of the checkpoint it was
        exported from), backend, precision, descriptor size, input size and flip. Two
        encoders whose records agree on :data:`rmgl.deploy.features.MODEL_KEYS` give
        comparable descriptors."""
        if self._provenance is None:
            source = self.source
            onnx = self.backend == "onnxruntime"
            self._provenance = {
                "checkpoint": None if onnx or not source else str(Path(source).resolve()),
                "onnx": str(Path(source).resolve()) if onnx else None,
                "model_sha256": _sha256_or_none(source),
                "source_checkpoint_sha256": self.meta.get("source_checkpoint_sha256")
                if onnx
                else None,
                "backend": self.backend,
                "device": str(self.device),
                "precision": self.meta.get("precision", "fp32")
                if onnx
                else {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
                    self.amp, str(self.amp)
                ),
                "descriptor_dim": self.descriptor_dim,
                "input_size": list(self.preprocess.size),
                "flip": self.preprocess.flip,
                "feature_names": self.feature_names,
            }
        return dict(self._provenance)

    # ------------------------------------------------------------------------ backends
    def _init_torch(self, model: Any, device: str | torch.device, amp: Any) -> None:
        if isinstance(model, (str, os.PathLike)):
            if Path(model).suffix == ".onnx":
                raise ValueError(
                    f"{model} is an ONNX model: use Encoder(..., backend='onnxruntime')"
                )
            model = load_model(model, device)
        elif not isinstance(model, torch.nn.Module) or not isinstance(
            getattr(model, "preprocess", None), Preprocess
        ):
            raise ValueError(
                "the torch backend needs an rmgl checkpoint path or the model rmgl.load_model "
                f"returns (it carries .preprocess), got {type(model).__name__}"
            )
        elif device != "auto":
            model.to(device if isinstance(device, torch.device) else resolve_device(device))
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.amp = (
            amp
            if isinstance(amp, torch.dtype) or amp is None
            else amp_dtype(amp, self.device, evaluation=True)
        )
        self.preprocess: Preprocess = model.preprocess
        self.descriptor_dim: int = model.descriptor_dim
        self.feature_names: list[str] = list(model.feature_names)
        self.source = getattr(model, "checkpoint", None)
        self.meta: dict[str, Any] = {}
        self.pixels = "normalized"  # what encode_batch's inputs are: always prepared inputs

    def _init_onnxruntime(
        self, path: Path, device: str | torch.device, threads: int | None
    ) -> None:
        ort = require("onnxruntime")
        meta = read_sidecar(path)
        self.meta = meta
        self.preprocess = Preprocess(
            int(meta["input"]["height"]),
            int(meta["input"]["width"]),
            tuple(meta["input"]["mean"]),
            tuple(meta["input"]["std"]),
            bool(meta["flip"]),
        )
        self.descriptor_dim = int(meta["output"]["dim"])
        self.feature_names = list(meta["feature_names"])
        self.source = str(path)
        self.pixels = str(meta.get("pixels", "normalized"))
        if self.pixels not in PIXEL_VARIANTS:
            raise ValueError(
                f"{sidecar_path(path)} says the model takes {self.pixels!r} inputs; this rmgl "
                f"knows {', '.join(PIXEL_VARIANTS)} (a newer rmgl wrote it?)"
            )
        name = str(device)
        available = ort.get_available_providers()
        if name == "auto":
            name = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if name.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise ValueError(
                    f"device {name}: this onnxruntime has no CUDA provider (install onnxruntime-gpu) "
                )
            index = int(name.split(":")[1]) if ":" in name else 0
            # TF32 off: the CUDA provider allows it by default, which can move ABP boundaries
            providers: list = [
                ("CUDAExecutionProvider", {"device_id": str(index), "use_tf32": "0"}),
                "CPUExecutionProvider",
            ]
        elif name == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for damaged files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is not a loadable ONNX model ({first})") from None
        self.device = torch.device("cuda" if name.startswith("cuda") else "cpu")
        self.provider = (
            "CUDAExecutionProvider" if name.startswith("cuda") else "CPUExecutionProvider"
        )
        self.amp = None
        self._input_name = self.session.get_inputs()[0].name

    # ------------------------------------------------------------------------ images
    def prepare(self, image: ImageInput, bgr: bool = False) -> torch.Tensor:
        """One image -> the (3, H, W) float32 model input (see the class docstring)."""
        if isinstance(image, (str, os.PathLike)):
            return prepare_file(image, self._transform)
        if isinstance(image, Image.Image):
            return self._transform(pil_to_tensor(image.convert("RGB")))
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(
                    f"a numpy image must be H x W x 3 uint8 (RGB, or BGR with bgr=True), got "
                    f"shape {image.shape} {image.dtype}"
                )
            pixels = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
            return self._transform(pixels.flip(0) if bgr else pixels)
        if isinstance(image, torch.Tensor):
            return self._prepare_tensor(image, bgr)
        raise ValueError(
            f"cannot encode a {type(image).__name__}: give paths, PIL images, H x W x 3 uint8 "
            "arrays or 3 x H x W tensors"
        )

    def _prepare_tensor(self, image: torch.Tensor, bgr: bool) -> torch.Tensor:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be 3 x H x W, got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return self._transform(image.flip(0) if bgr else image)
        if image.dtype != torch.float32:
            raise ValueError(
                f"a tensor image must be uint8 (raw RGB) or float32 (prepared input), got {image.dtype}"
            )
        if tuple(image.shape[1:]) != self.preprocess.size:
            raise ValueError(
                f"a float32 tensor is taken as a prepared input and must be 3 x "
                f"{self.preprocess.height} x {self.preprocess.width}, got {tuple(image.shape)}; "
                "give uint8 pixels to have it resized and normalised"
            )
        return image

    # ------------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Prepared inputs (N, 3, H, W) float32 -> (N, D) float32 descriptors."""
        if self.backend == "torch":
            zeros = torch.zeros(len(batch), dtype=torch.long)
            found = extract_features(
                self.model,
                [(batch, zeros, zeros)],
                device=self.device,
                flip=self.preprocess.flip,
                amp=self.amp,
                progress=False,
            )
            return found.features.numpy()
        feed = batch if self.pixels == "normalized" else self._pixels_of(batch)
        output = self.session.run(None, {self._input_name: feed.contiguous().numpy()})[0]
        return np.asarray(output, dtype=np.float32)

    def _pixels_of(self, batch: torch.Tensor) -> torch.Tensor:
        """Prepared inputs back to the resized 0-255 pixels a raw-pixel graph takes: exact for
        inputs prepared from uint8 images (the resize outputs uint8), which ``uint8`` rounds
        to; ``float255`` keeps any fraction of an input prepared some other way."""
        mean = torch.tensor(self.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
        pixels = (batch.float() * std + mean) * 255.0
        if self.pixels == "uint8":
            return pixels.round().clamp(0, 255).to(torch.uint8)
        return pixels

    def iter_encode(self, images: Iterable[ImageInput], bgr: bool = False) -> Iterator[np.ndarray]:
        """(b, D) arrays, one per batch of ``batch_size`` images, in order; a stream of
        images is never held in memory at once."""
        batch: list[torch.Tensor] = []
        for image in images:
            batch.append(self.prepare(image, bgr))
            if len(batch) == self.batch_size:
                yield self.encode_batch(torch.stack(batch))
                batch = []
        if batch:
            yield self.encode_batch(torch.stack(batch))

    def encode(
        self, images: Iterable[ImageInput], bgr: bool = False, progress: bool = False
    ) -> np.ndarray:
        """(N, D) float32 descriptors of ``images``, row i for image i; rows have norm 1.

        An unreadable file raises :class:`rmgl.data.loading.UnreadableImageError` naming it
        (``rmgl extract`` skips such files instead and lists them).
        """
        total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
        parts = []
        with tqdm(total=total, unit="img", disable=not progress, leave=False) as bar:
            for part in self.iter_encode(images, bgr):
                parts.append(part)
                bar.update(len(part))
        if not parts:
            return np.zeros((0, self.descriptor_dim), dtype=np.float32)
        return np.concatenate(parts)

    def __repr__(self) -> str:
        return (
            f"Encoder(backend={self.backend!r}, source={self.source!r}, device={str(self.device)!r}, "
            f"input={self.preprocess.height}x{self.preprocess.width}, dim={self.descriptor_dim})"
        )


def _auto_backend(model: Any, onnx_path: Any) -> str:
    """``backend="auto"``: onnxruntime for an exported ``.onnx`` file, torch for anything else
    (a checkpoint path or a loaded model)."""
    if onnx_path is not None:
        return "onnxruntime"
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx":
        return "onnxruntime"
    return "torch"


def _sha256_or_none(path: Any) -> str | None:
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        return sha256_file(path)
    except OSError:
        return None
