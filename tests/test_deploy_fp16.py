"""`rmgl export --fp16`: a half-precision graph with float32 input and output, within its
documented tolerance of the float32 torch model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rmgl.cli import main
from rmgl.deploy import Encoder, read_sidecar
from rmgl.deploy.export import FP16_MIN_COSINE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fp16_export_runs_in_half_precision_within_its_tolerance(
    tiny_data, tiny_checkpoint, tmp_path, capsys
):
    root, checkpoint = tiny_data, tiny_checkpoint
    out = tmp_path / "half.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--format",
                "onnx",
                "--out",
                str(out),
                "--fp16",
            ]
        )
        == 0
    )
    assert "fp16" in capsys.readouterr().out
    meta = read_sidecar(out)
    assert meta["precision"] == "fp16" and meta["input"]["dtype"] == "float32"
    assert meta["parity"]["tolerance"] == {"min_cosine": FP16_MIN_COSINE}
    assert meta["parity"]["min_cosine"] >= FP16_MIN_COSINE
    graph = onnx.load(str(out))
    weights = {
        onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        for t in graph.graph.initializer
        if len(t.dims) == 4
    }
    assert weights == {np.dtype(np.float16)}  # the convolutions' weights are half precision
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    images = sorted((root / "query").glob("*.jpg"))[:8]
    half = Encoder(out, backend="onnxruntime", batch_size=3).encode(images)
    full = Encoder(checkpoint, device="cpu").encode(images)
    assert half.dtype == np.float32
    cosine = (half * full).sum(1)
    assert cosine.min() >= FP16_MIN_COSINE
    assert np.abs(half - full).max() > 1e-6  # it really is another precision
