"""Shapes, feature lists and descriptor sizes of every variant."""

from __future__ import annotations

import pytest
import torch

from rmgl.model import RMGLConfig, RMGLOutput, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = (96, 32)  # ResNet-18 at 96x32: 24 rows before layer2, 6 rows at the output


def _small(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    options.setdefault("backbone", "resnet18")
    return build_model(RMGLConfig(pretrained="none", **options), 7)


@pytest.mark.parametrize(
    ("branches", "n_features"),
    [((2, 3), 14), ((2, 3, 4), 24), ((1, 2, 3), 15), ((2,), 6), ((3,), 8), ((1,), 1)],
)
def test_descriptor_size_per_branch_list(branches, n_features):
    model = _small(branches=branches).eval()
    assert len(model.feature_names) == n_features
    with torch.no_grad():
        out = model(torch.randn(2, 3, *SMALL))
    assert tuple(out.shape) == (2, 256 * n_features) == (2, model.descriptor_dim)


@pytest.mark.parametrize(
    ("position", "n_features", "rp_rows"),
    [
        ("input", 14, (3, 2)),
        ("after_stem", 14, (3, 2)),
        ("after_layer1", 14, (3, 2)),
        ("after_layer2", 14, (3, 2)),
        ("after_layer3", 14, (3, 2)),
        ("output", 7, None),
    ],
)
def test_rp_positions(position, n_features, rp_rows):
    model = _small(rp_position=position).eval()
    x = torch.randn(2, 3, *SMALL)
    with torch.no_grad():
        maps = model.branch_maps(x)
        out = model(x)
    assert out.shape == (2, 256 * n_features)
    for branch, m in zip(model.branches, maps, strict=True):
        assert tuple(m.original.shape) == (2, 512, 6, 2)
        if rp_rows is None:
            assert m.cut is None and m.partitioned == []
            continue
        k = branch.stripes
        assert len(m.partitioned) == k
        rows = {2: rp_rows[0], 3: rp_rows[1]}[k]
        assert all(tuple(p.shape) == (2, 512, rows, 2) for p in m.partitioned)


def test_feature_order_is_documented_order():
    model = _small(branches=(2, 3))
    assert model.feature_names == [
        "b2.orig.global", "b2.orig.s1", "b2.orig.s2",
        "b2.rp.global", "b2.rp.s1", "b2.rp.s2",
        "b3.orig.global", "b3.orig.s1", "b3.orig.s2", "b3.orig.s3",
        "b3.rp.global", "b3.rp.s1", "b3.rp.s2", "b3.rp.s3",
    ]  # fmt: skip
    assert _small(branches=(2,), only_rp=True).feature_names == [
        "b2.orig.global",
        "b2.rp.global",
        "b2.rp.s1",
        "b2.rp.s2",
    ]
    assert _small(branches=(1, 2), rp_position="output").feature_names == [
        "b1.orig.global",
        "b2.orig.global",
        "b2.orig.s1",
        "b2.orig.s2",
    ]


def test_descriptor_is_the_concatenation_in_feature_order():
    model = _small().eval()
    x = torch.randn(2, 3, *SMALL)
    with torch.no_grad():
        descriptor = model(x)
        model.train()
        for m in model.modules():  # training-mode structure with eval-mode statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        out = model(x)
    assert isinstance(out, RMGLOutput)
    assert out.names == model.feature_names
    assert torch.allclose(out.descriptor, descriptor, atol=1e-6)
    assert torch.allclose(
        torch.cat([out.branch_features["b2"], out.branch_features["b3"]], 1), descriptor, atol=1e-6
    )


def test_training_output_structure():
    model = _small(branches=(2, 3)).train()
    out = model(torch.randn(4, 3, *SMALL))
    assert list(out.logits) == model.feature_names
    assert all(v.shape == (4, 7) for v in out.logits.values())
    assert all(v.shape == (4, 256) for v in out.features.values())
    assert {k: v.shape[1] for k, v in out.branch_features.items()} == {"b2": 6 * 256, "b3": 8 * 256}


@pytest.mark.parametrize(
    ("arch", "channels"), [("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048)]
)
def test_backbone_depths(arch, channels):
    model = _small(backbone=arch).eval()
    with torch.no_grad():
        maps = model.branch_maps(torch.randn(1, 3, *SMALL))
        out = model(torch.randn(1, 3, *SMALL))
    assert tuple(maps[0].original.shape) == (1, channels, 6, 2)
    assert out.shape == (1, 3584)


def test_paper_model_resnet50_384x128():
    torch.manual_seed(0)
    model = build_model(RMGLConfig(pretrained="none"), 751).eval()
    x = torch.randn(1, 3, 384, 128)
    with torch.no_grad():
        maps = model.branch_maps(x)
        out = model(x)
    assert tuple(maps[0].original.shape) == (1, 2048, 24, 8)
    assert [tuple(p.shape) for p in maps[0].partitioned] == [(1, 2048, 12, 8)] * 2
    assert [tuple(p.shape) for p in maps[1].partitioned] == [(1, 2048, 8, 8)] * 3
    assert out.shape == (1, 3584)
    n_params = sum(p.numel() for p in model.parameters())
    assert 56_000_000 < n_params < 58_000_000  # 56.84 M with 751 classes (docs/model.md)


def test_indivisible_height_names_heights_that_work():
    model = _small(branches=(2, 3)).eval()
    with pytest.raises(ValueError, match=r"not divisible by K=2.*heights that work: \[.*96") as err:
        model(torch.randn(1, 3, 100, 32))  # 25 rows before layer2
    suggested = [int(h) for h in str(err.value).split("[")[1].rstrip("]").split(",")]
    for h in suggested:  # every suggestion really works
        with torch.no_grad():
            model(torch.randn(1, 3, h, 32))


@pytest.mark.parametrize(
    "options",
    [
        {"branches": (2, 2)},
        {"branches": (0,)},
        {"rp_position": "layer5"},
        {"abp": "yes"},
        {"pooling": "sum"},
        {"abp_pool": "gem"},
    ],
)
def test_bad_options_are_rejected(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        _small(**options)


def test_only_rp_without_an_rp_path_is_an_error_that_says_what_to_do():
    with pytest.raises(
        ValueError,
        match=r"only_rp=true needs a receptive partition; rp_position=output has none .*"
        r"choose an RP position \(input, after_stem, after_layer1, after_layer2, after_layer3\) "
        r"or set only_rp=false",
    ):
        _small(only_rp=True, rp_position="output")
    assert len(_small(only_rp=True, rp_position="after_layer2").feature_names) == 9  # 2 + 7


@pytest.mark.parametrize("pooling", ["avg", "gem"])
def test_other_poolings_run(pooling):
    model = _small(pooling=pooling, abp="off").train()
    out = model(torch.randn(2, 3, *SMALL))
    assert out.descriptor.shape == (2, 3584)
