"""The study switches (docs/training.md, "Study switches"): the ``on_epoch_start`` hook, the
RSA schedule, the ABP warm-up, path-specific BatchNorm for RP, CE / triplet reductions and
the BNNeck head. Each test shows that a switch does what it says and that its default is the
behaviour the project had before it (the paper's recipe)."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from rmgl.data.datasets import load_dataset
from rmgl.data.loading import train_loader
from rmgl.data.synthetic import SynthConfig, generate
from rmgl.data.transforms import AugmentConfig, build_train_transform
from rmgl.engine import Callback, ConfigError, Trainer, load_config, load_model
from rmgl.engine.callbacks import PeriodicEvaluation, _random_shift, rsa_probability
from rmgl.engine.checkpoint import save_checkpoint
from rmgl.engine.config import to_yaml
from rmgl.engine.load import model_config
from rmgl.engine.schedule import build_optimizer
from rmgl.losses import RMGLLoss
from rmgl.model import RMGLConfig, build_model
from rmgl.model.network import PathBatchNorm
from rmgl.registry import architecture_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = (48, 16)  # ResNet-18: 12 rows before layer2, a 3x1 final map
PIDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
TINY = [
    "data.dataset=folder",
    "data.height=48",
    "data.width=16",
    "data.num_identities=2",
    "data.num_instances=2",
    "data.workers=0",
    "data.test_batch_size=64",
    "model.backbone=resnet18",
    "model.pretrained=none",
    "model.branches=[2]",
    "optim.warmup_epochs=1",
    "optim.milestones=[5]",
    "eval.every=0",
    "run.log_every=1",
]


def _model(**options) -> nn.Module:
    torch.manual_seed(0)
    options.setdefault("backbone", "resnet18")
    return build_model(RMGLConfig(pretrained="none", **options), 7)


def _images(n: int = 8, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study_synth")
    generate(
        SynthConfig(
            seed=6,
            train_ids=4,
            test_ids=3,
            distractors=2,
            junk=1,
            cameras_per_id=(2, 2),
            images_per_camera=(2, 2),
        ),
        root,
        workers=1,
        progress=False,
    )
    return root


# --- config ------------------------------------------------------------------------------
def test_new_keys_default_to_the_papers_recipe():
    cfg = load_config()
    assert (cfg.data.augment.rsa_start_epoch, cfg.data.augment.rsa_ramp_epochs) == (0, 0)
    assert (cfg.model.abp_warmup_epochs, cfg.model.rp_batchnorm, cfg.model.head) == (
        0,
        "shared",
        "reduction",
    )
    assert (cfg.loss.ce_reduction, cfg.loss.triplet_reduction) == ("sum", "sum")
    # rp_batchnorm and head define the network: a checkpoint only fits a model that agrees
    assert {"rp_batchnorm", "head"} <= set(architecture_keys(RMGLConfig))
    assert "abp_warmup_epochs" not in architecture_keys(type(model_config(cfg)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.rp_batchnorm=split"],
            "model.rp_batchnorm='split' is not one of: shared, separate",
        ),
        (["model.head=neck"], "model.head='neck' is not one of: reduction, bnneck"),
        (["loss.ce_reduction=avg"], "loss.ce_reduction='avg' is not one of: sum, mean"),
        (["loss.triplet_reduction=max"], "loss.triplet_reduction='max' is not one of: sum, mean"),
        (["loss.triplet_weight=-0.5"], "loss.triplet_weight"),
        (["model.abp_warmup_epochs=-1"], "model.abp_warmup_epochs=-1 must be >= 0"),
        (["data.augment.rsa_start_epoch=-1"], "data.augment.rsa_start_epoch=-1 must be >= 0"),
        (["data.augment.rsa_ramp_epochs=-2"], "data.augment.rsa_ramp_epochs=-2 must be >= 0"),
        (
            ["model.abp_warmup_epochs=5", "model.abp=test"],
            "needs ABP in training (model.abp=train or both)",
        ),
        (
            ["model.rp_batchnorm=separate", "model.rp_position=output"],
            "needs a receptive partition",
        ),
    ],
)
def test_bad_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


# --- on_epoch_start and the two schedules in the trainer ----------------------------------
class Recorder(Callback):
    """What the epoch's settings were when the epoch started."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_epoch_start(self, trainer, epoch):
        shift = _random_shift(trainer.loader.dataset.transform)
        self.seen.append(("start", epoch, shift.p, trainer.model.abp_warmup))

    def on_epoch_end(self, trainer, epoch, summary):
        self.seen.append(("end", epoch))


def test_default_schedules_keep_the_papers_settings_every_epoch(tiny_data, tmp_path, monkeypatch):
    """Hook order and defaults, without training: RSA at the configured p and ABP every epoch."""
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.root={tiny_data}",
            f"run.output_dir={tmp_path}",
            "optim.epochs=3",
            "data.augment.rsa=0.3",
        ],
    )
    recorder = Recorder()
    with Trainer(cfg, progress=False, callbacks=[recorder]) as trainer:
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, PeriodicEvaluation)]
        monkeypatch.setattr(trainer, "train_epoch", lambda epoch: {"loss": 0.0})
        monkeypatch.setattr(trainer, "save", lambda name, epoch: None)
        trainer.train()
    assert recorder.seen == [x for e in range(3) for x in (("start", e, 0.3, False), ("end", e))]


def test_schedules_follow_the_epoch_and_a_resumed_run_equals_an_uninterrupted_one(
    tiny_data, tmp_path
):
    """RSA ramps 0.25 -> 0.5 and ABP takes over after one uniform epoch; a run stopped after
    epoch 1 and resumed trains epoch 2 exactly as the uninterrupted run, though the resumed
    process starts with other values in the transform and the model flag."""
    base = [
        *TINY,
        f"data.root={tiny_data}",
        f"run.output_dir={tmp_path}",
        "optim.epochs=2",
        "data.augment.rsa=0.5",
        "data.augment.rsa_ramp_epochs=2",
        "model.abp_warmup_epochs=1",
    ]
    full = Recorder()
    with Trainer(
        load_config(None, [*base, "run.name=full"]), progress=False, callbacks=[full]
    ) as trainer:
        trainer.train()
    assert full.seen == [("start", 0, 0.25, True), ("end", 0), ("start", 1, 0.5, False), ("end", 1)]

    with Trainer(
        load_config(None, [*base, "run.name=cut", "optim.epochs=1"]), progress=False
    ) as trainer:
        trainer.train()
    resumed = Recorder()
    with Trainer(
        load_config(None, [*base, "run.name=cut"]), resume=True, progress=False, callbacks=[resumed]
    ) as trainer:
        trainer.model.abp_warmup = True  # what a fresh process may hold must not matter
        _random_shift(trainer.loader.dataset.transform).p = 0.123
        trainer.train()
    assert resumed.seen == full.seen[2:]

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines
        ]

    expected = [r for r in rows("full") if r["epoch"] == 2]
    assert expected and [r for r in rows("cut") if r["epoch"] == 2] == expected
    a, b = (
        load_file(str(tmp_path / "full" / "last.safetensors")),
        load_file(str(tmp_path / "cut" / "last.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


# --- RSA schedule --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "ramp", "expected"),
    [
        (0, 0, [0.5, 0.5, 0.5, 0.5, 0.5]),  # the default: the paper's p throughout
        (2, 0, [0.0, 0.0, 0.5, 0.5, 0.5]),
        (0, 2, [0.25, 0.5, 0.5, 0.5, 0.5]),
        (1, 4, [0.0, 0.125, 0.25, 0.375, 0.5]),
    ],
)
def test_rsa_probability_per_epoch(start, ramp, expected):
    assert [rsa_probability(epoch, 0.5, start, ramp) for epoch in range(5)] == expected


def test_rsa_probability_set_before_an_epoch_reaches_the_loader_workers(tiny_data):
    """The trainer changes p in the main process; the epoch's (new) worker must draw with it."""
    records = load_dataset("folder", str(tiny_data)).train

    def first_batch(transform) -> torch.Tensor:
        loader = train_loader(
            records, transform, num_identities=2, num_instances=2, workers=1, seed=0
        )
        torch.manual_seed(0)
        return next(iter(loader))[0]

    scheduled = build_train_transform(SIZE, AugmentConfig(rsa=0.5))
    shift = _random_shift(scheduled)
    shift.p = 0.0
    without = first_batch(scheduled)
    assert torch.equal(without, first_batch(build_train_transform(SIZE, AugmentConfig(rsa=0.0))))
    shift.p = 1.0
    always = first_batch(scheduled)
    assert torch.equal(always, first_batch(build_train_transform(SIZE, AugmentConfig(rsa=1.0))))
    assert not torch.equal(always, without)


# --- ABP warm-up ---------------------------------------------------------------------------
def _training_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train()  # a copy: BN statistics stay as they were
    with torch.no_grad():
        return model(x).features


def test_abp_warmup_trains_on_uniform_stripes_with_the_abp_operator():
    """Warm-up = abp='test' in training (uniform stripes, ABP's operator); off = ABP; the
    evaluation and the state dict do not depend on the flag."""
    x = _images(4, (96, 32))  # a 6x2 final map, so ABP boundaries can move
    model, uniform = _model(abp="both"), _model(abp="test")
    uniform.load_state_dict(model.state_dict())
    assert model.abp_warmup is False  # the default: ABP as configured
    reference = _training_features(uniform, x)
    model.abp_warmup = True
    warm = _training_features(model, x)
    assert all(torch.equal(warm[k], reference[k]) for k in reference)
    model.abp_warmup = False
    abp = _training_features(model, x)
    moved = [k for k in reference if not torch.equal(abp[k], reference[k])]
    assert moved and all(".orig.s" in k for k in moved)

    state = model.state_dict()
    model.eval()
    with torch.no_grad():
        descriptor = model(x)
        model.abp_warmup = True
        assert torch.equal(model(x), descriptor)
    assert model.state_dict().keys() == state.keys() and not any("warmup" in k for k in state)


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
    after_cut = [
        n
        for n, m in separate.named_modules()
        if n.split(".")[2:3] and n.split(".")[2] in ("layer2", "layer3", "layer4")
    ]
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
        original_only.load_state_dict(
            {k: v for k, v in model.state_dict().items() if k in original_only.state_dict()}
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, _ = RMGLLoss()(model.train()(x), PIDS)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            original_only.train()(x)
        pairs = [
            (n, m, original_only.get_submodule(n))
            for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d)
            and ".layer" in n
            and ".rp" not in n
            and "branches." in n
        ]
        same = [
            torch.equal(m.running_mean, r.running_mean)
            and torch.equal(m.running_var, r.running_var)
            for _, m, r in pairs
        ]
        if mode == "shared":
            assert not any(same)
        else:
            assert all(same)
            # every BN after a 3x3 conv sees other inputs on the RP path (zero padding at the
            # stripe borders); a 1x1 conv right after the cut sees the same pixels
            norms = [m for n, m, _ in pairs if n.endswith(("bn1", "bn2"))]
            assert all(not torch.equal(m.running_mean, m.rp.running_mean) for m in norms)
            assert all(not torch.equal(m.weight, m.rp.weight) for m in norms)


@pytest.mark.parametrize(
    ("position", "layers"),
    [
        ("input", {"layer2", "layer3", "layer4"}),
        ("after_layer1", {"layer2", "layer3", "layer4"}),
        ("after_layer2", {"layer3", "layer4"}),
        ("after_layer3", {"layer4"}),
    ],
)
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
            head.register_forward_hook(
                lambda m, args, out, name=name: captured.__setitem__(name, args[0])
            )
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
        assert torch.equal(
            descriptor, torch.cat([heads[n](pooled[n]) for n in model.feature_names], dim=1)
        )


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
        necked = F.batch_norm(
            feature, None, None, head.neck.weight, head.neck.bias, training=True, eps=head.neck.eps
        )
        assert torch.allclose(out.logits[name], head.classifier(necked), atol=1e-6)
    assert torch.equal(
        out.branch_features["b2"], torch.cat([out.features[n] for n in heads], dim=1)
    )

    model.eval()
    with torch.no_grad():
        descriptor = model(x)
        expected = []
        for name, head in heads.items():
            bn = head.neck
            feature = head(pooled[name])
            expected.append(
                (feature - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
                + bn.bias
            )
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
        assert got_terms.keys() == terms.keys() and all(
            torch.equal(got_terms[k], terms[k]) for k in terms
        )
        assert torch.allclose(got, expected)
    # the CE's share of the gradient: a classifier's gradient is 1/14 of its summed one
    weight = model.branches[0].heads["orig_global"].classifier.weight
    summed = torch.autograd.grad(total, weight, retain_graph=True)[0]
    averaged = torch.autograd.grad(RMGLLoss(ce_reduction="mean")(out, PIDS)[0], weight)[0]
    assert torch.allclose(averaged * 14, summed, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="ce_reduction must be one of"):
        RMGLLoss(ce_reduction="avg")


def test_triplet_weight_scales_the_triplet_family_and_zero_leaves_cross_entropy_alone():
    model = _model()
    out = model.train()(_images())
    _, terms = RMGLLoss()(out, PIDS)
    ce = sum(v for k, v in terms.items() if k.startswith("ce/"))
    triplet = sum(v for k, v in terms.items() if k.startswith("triplet/"))
    assert triplet > 0  # an untrained network violates the margin: the check below can fail
    for weight in (0.0, 0.5, 2.0):
        got, got_terms = RMGLLoss(triplet_weight=weight)(out, PIDS)
        assert torch.allclose(got, ce + weight * triplet)
        assert got_terms.keys() == terms.keys()  # the triplet terms are still logged
    # with weight 0 the triplet sends no gradient: the gradient equals cross-entropy's alone
    weight = model.branches[0].heads["orig_global"].reduction[0].weight
    ce_only = torch.autograd.grad(
        RMGLLoss(triplet_weight=0.0)(out, PIDS)[0], weight, retain_graph=True
    )[0]
    ce_graph = sum(
        torch.nn.functional.cross_entropy(logits, PIDS) for logits in out.logits.values()
    )
    by_hand = torch.autograd.grad(ce_graph, weight, retain_graph=True)[0]
    assert torch.allclose(ce_only, by_hand)
    with pytest.raises(ValueError, match="triplet_weight must be >= 0"):
        RMGLLoss(triplet_weight=-1.0)


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
@pytest.mark.parametrize(
    ("rp_batchnorm", "head"), [("separate", "reduction"), ("shared", "bnneck")]
)
def test_checkpoint_of_an_option_loads_with_load_model(tmp_path, rp_batchnorm, head):
    cfg = load_config(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=none",
            "model.branches=[2]",
            f"model.rp_batchnorm={rp_batchnorm}",
            f"model.head={head}",
            "data.height=48",
            "data.width=16",
        ],
    )
    model = _model(branches=(2,), rp_batchnorm=rp_batchnorm, head=head)
    optimizer = build_optimizer(model, cfg.optim)
    loss, _ = RMGLLoss()(model.train()(_images()), PIDS)
    loss.backward()
    optimizer.step()
    if head == "bnneck":  # weight decay and momentum leave the frozen bias at 0
        assert all(not h.neck.bias.any() for h in model.branches[0].heads.values())
    path = save_checkpoint(
        tmp_path / "m.safetensors", model, to_yaml(cfg), {"epoch": 0, "num_classes": 7}, optimizer
    )
    loaded = load_model(path, device="cpu")
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
