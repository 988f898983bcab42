"""Study switches of the model and the loss (docs/model.md, sections 2, 6, 7): path-specific
BatchNorm for RP, the BNNeck head, CE and triplet reductions over the heads. Each test shows
that a switch does what it says and that its default is the behaviour from before."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmgl.engine import ConfigError, load_config, load_model
from rmgl.engine.checkpoint import save_checkpoint
from rmgl.engine.config import to_yaml
from rmgl.engine.schedule import build_optimizer
from rmgl.losses import RMGLLoss
from rmgl.model import build_model
from rmgl.model.network import PathBatchNorm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = (48, 16)  # ResNet-18: 12 rows before layer2, a 3x1 final map
PIDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _model(**options) -> nn.Module:
    torch.manual_seed(0)
    options.setdefault("backbone", "resnet18")
    return build_model(7, pretrained="none", **options)


def _images(n: int = 8, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.rp_batchnorm=split"], "model.rp_batchnorm='split' is not one of: shared, separate"),
    (["model.head=neck"], "model.head='neck' is not one of: reduction, bnneck"),
    (["loss.ce_reduction=avg"], "loss.ce_reduction='avg' is not one of: sum, mean"),
    (["loss.triplet_reduction=max"], "loss.triplet_reduction='max' is not one of: sum, mean"),
    (["model.rp_batchnorm=separate", "model.rp_position=output"], "needs a receptive partition"),
])
def test_bad_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


# --- path-specific BatchNorm for RP --------------------------------------------------------
def test_shared_batchnorm_is_the_single_set_of_layers():
    model = _model()
    assert not any(isinstance(m, PathBatchNorm) for m in model.modules())
    assert not any(".rp." in k for k in model.state_dict())


def test_separate_batchnorm_shares_convolutions_and_starts_as_the_original_paths():
    shared, separate = _model(), _model(rp_batchnorm="separate")
    a, b = shared.state_dict(), separate.state_dict()
    extra = set(b) - set(a)
    assert set(a) <= set(b) and extra and all(torch.equal(a[k], b[k]) for k in a)
    for key in extra:  # <bn>.rp.<tensor>, a copy of <bn>.<tensor>
        assert ".rp." in key and torch.equal(b[key], b[key.replace(".rp.", ".")])
    count = Counter(type(m) for m in separate.modules())
    assert count[nn.Conv2d] == Counter(type(m) for m in shared.modules())[nn.Conv2d]

    # one forward: every conv after the cut runs twice (both paths), every PathBatchNorm
    # twice, and its `rp` once (the RP path's call)
    calls: Counter = Counter()
    for name, module in separate.named_modules():
        module.register_forward_pre_hook(lambda m, args, name=name: calls.update([name]))
    x = _images()
    with torch.no_grad():
        descriptor = separate.eval()(x)
        assert torch.equal(descriptor, shared.eval()(x))  # identical until trained
    after_cut = [n for n, m in separate.named_modules()
                 if n.split(".")[2:3] and n.split(".")[2] in ("layer2", "layer3", "layer4")]
    convs = [n for n in after_cut if isinstance(separate.get_submodule(n), nn.Conv2d)]
    norms = [n for n in after_cut if isinstance(separate.get_submodule(n), PathBatchNorm)]
    assert convs and norms and len(norms) == len([k for k in extra if k.endswith(".rp.weight")])
    assert all(calls[n] == 2 for n in convs + norms) and all(calls[f"{n}.rp"] == 1 for n in norms)

    # the optimizer sees each parameter once
    optimizer = build_optimizer(separate, load_config().optim)
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(separate.parameters()))


def test_separate_batchnorm_keeps_each_paths_statistics_and_affine_parameters():
    """After a training step the original path's BN statistics are those of the full maps
    alone (an output-only model with the same weights), the RP path's differ; with shared
    BatchNorm the full-map statistics are mixed with the stripes'."""
    x = _images()
    for mode in ("shared", "separate"):
        model = _model(rp_batchnorm=mode)
        original_only = _model(rp_position="output")
        original_only.load_state_dict({k: v for k, v in model.state_dict().items() if k in original_only.state_dict()})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, _ = RMGLLoss()(model.train()(x), PIDS)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            original_only.train()(x)
        pairs = [(n, m, original_only.get_submodule(n)) for n, m in model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) and ".layer" in n and ".rp" not in n and "branches." in n]
        same = [torch.equal(m.running_mean, r.running_mean) and torch.equal(m.running_var, r.running_var)
                for _, m, r in pairs]
        if mode == "shared":
            assert not any(same)
        else:
            assert all(same)
            # every BN after a 3x3 conv sees other inputs on the RP path (zero padding at the
            # stripe borders); a 1x1 conv right after the cut sees the same pixels
            norms = [m for n, m, _ in pairs if n.endswith(("bn1", "bn2"))]
            assert all(not torch.equal(m.running_mean, m.rp.running_mean) for m in norms)
            assert all(not torch.equal(m.weight, m.rp.weight) for m in norms)


@pytest.mark.parametrize(("position", "layers"), [
    ("input", {"layer2", "layer3", "layer4"}),
    ("layer2", {"layer2", "layer3", "layer4"}),
    ("layer3", {"layer3", "layer4"}),
    ("layer4", {"layer4"}),
])
def test_separate_batchnorm_only_where_the_rp_path_runs(position, layers):
    """RP BatchNorm layers exist only after the cut, and every parameter gets a gradient
    (DDP refuses unused parameters)."""
    model = _model(rp_batchnorm="separate", rp_position=position, branches=(3,))
    assert {k.split(".")[2] for k in model.state_dict() if ".rp." in k} == layers
    loss, _ = RMGLLoss()(model.train()(_images()), PIDS)
    loss.backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# --- BNNeck --------------------------------------------------------------------------------
def _pooled_inputs(model: nn.Module) -> dict:
    """Each head's input (the pooled vector), captured on the next forward."""
    captured = {}
    for branch in model.branches:
        for part, head in branch.heads.items():
            name = f"{branch.name}.{part.replace('_', '.')}"
            head.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, args[0]))
    return captured


def test_reduction_head_is_one_feature_for_triplet_classifier_and_descriptor():
    model = _model(branches=(2,))
    assert all(isinstance(h.neck, nn.Identity) for b in model.branches for h in b.heads.values())
    assert not any("neck" in k for k in model.state_dict())
    pooled, x = _pooled_inputs(model), _images()
    out = model.train()(x)
    heads = dict(zip(model.feature_names, model.branches[0].heads.values(), strict=True))
    for name, head in heads.items():
        assert (out.features[name] >= 0).all()  # after the ReLU
        assert torch.equal(out.logits[name], head.classifier(out.features[name]))
    model.eval()
    with torch.no_grad():
        descriptor = model(x)
        assert torch.equal(descriptor, torch.cat([heads[n](pooled[n]) for n in model.feature_names], dim=1))


def test_bnneck_head_triplet_before_the_batchnorm_classifier_and_descriptor_after():
    model = _model(head="bnneck", branches=(2,))
    heads = dict(zip(model.feature_names, model.branches[0].heads.values(), strict=True))
    for head in heads.values():
        assert [type(m) for m in head.reduction] == [nn.Conv2d]
        assert isinstance(head.neck, nn.BatchNorm1d) and not head.neck.bias.requires_grad
    pooled, x = _pooled_inputs(model), _images()
    out = model.train()(x)
    for name, head in heads.items():
        feature = out.features[name]
        assert torch.equal(feature, head.reduction(pooled[name][:, :, None, None]).flatten(1))
        assert (feature < 0).any()  # no ReLU
        necked = F.batch_norm(feature, None, None, head.neck.weight, head.neck.bias, training=True, eps=head.neck.eps)
        assert torch.allclose(out.logits[name], head.classifier(necked), atol=1e-6)
    assert torch.equal(out.branch_features["b2"], torch.cat([out.features[n] for n in heads], dim=1))

    model.eval()
    with torch.no_grad():
        descriptor = model(x)
        expected = []
        for name, head in heads.items():
            bn = head.neck
            feature = head(pooled[name])
            expected.append((feature - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    assert torch.allclose(descriptor, torch.cat(expected, dim=1), atol=1e-5)


# --- losses ------------------------------------------------------------------------------
def test_loss_reductions_and_the_names_of_the_terms():
    model = _model()
    out = model.train()(_images())
    total, terms = RMGLLoss()(out, PIDS)
    assert torch.equal(total.detach(), sum(terms.values()))  # Eq. 4, unit weights, as before
    ce = [v for k, v in terms.items() if k.startswith("ce/")]
    triplet = [v for k, v in terms.items() if k.startswith("triplet/")]
    assert (len(ce), len(triplet)) == (14, 2) and len(terms) == 16
    for ce_mode, triplet_mode, expected in [
        ("mean", "mean", sum(ce) / 14 + sum(triplet) / 2),
        ("mean", "sum", sum(ce) / 14 + sum(triplet)),
        ("sum", "mean", sum(ce) + sum(triplet) / 2),
    ]:
        got, got_terms = RMGLLoss(ce_reduction=ce_mode, triplet_reduction=triplet_mode)(out, PIDS)
        assert got_terms.keys() == terms.keys() and all(torch.equal(got_terms[k], terms[k]) for k in terms)
        assert torch.allclose(got, expected)
    # the CE's share of the gradient: a classifier's gradient is 1/14 of its summed one
    weight = model.branches[0].heads["orig_global"].classifier.weight
    summed = torch.autograd.grad(total, weight, retain_graph=True)[0]
    averaged = torch.autograd.grad(RMGLLoss(ce_reduction="mean")(out, PIDS)[0], weight)[0]
    assert torch.allclose(averaged * 14, summed, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="ce_reduction must be one of"):
        RMGLLoss(ce_reduction="avg")


def test_every_option_keeps_the_logged_term_names():
    x = _images()
    names = None
    for options in [{}, {"head": "bnneck"}, {"rp_batchnorm": "separate"}]:
        out = _model(**options).train()(x)
        for criterion in (RMGLLoss(), RMGLLoss(ce_reduction="mean", triplet_reduction="mean")):
            _, terms = criterion(out, PIDS)
            names = names or list(terms)
            assert list(terms) == names
    assert names[0] == "ce/b2.orig.global" and names[-1] == "triplet/b3"


# --- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize(("rp_batchnorm", "head"), [("separate", "reduction"), ("shared", "bnneck")])
def test_checkpoint_of_an_option_loads_with_load_model(tmp_path, rp_batchnorm, head):
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none", "model.branches=[2]",
                             f"model.rp_batchnorm={rp_batchnorm}", f"model.head={head}",
                             "data.height=48", "data.width=16"])
    model = _model(branches=(2,), rp_batchnorm=rp_batchnorm, head=head)
    optimizer = build_optimizer(model, cfg.optim)
    loss, _ = RMGLLoss()(model.train()(_images()), PIDS)
    loss.backward()
    optimizer.step()
    if head == "bnneck":  # weight decay and momentum leave the frozen bias at 0
        assert all(not h.neck.bias.any() for h in model.branches[0].heads.values())
    path = save_checkpoint(tmp_path / "m.safetensors", model, to_yaml(cfg), {"epoch": 0, "num_classes": 7}, optimizer)
    loaded = load_model(path, device="cpu")
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
