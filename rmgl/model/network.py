"""The RMGL network (paper §III-A to §III-C, Fig. 2-3; docs/model.md, "Architecture").

Reading guide, top to bottom:

* a shared trunk (``stem`` + ``layer1``) runs once per image;
* each branch owns a deep copy of ``layer2..layer4`` and cuts its maps into K stripes;
* inside a branch there are two paths through the same weights: the *original* path (the
  full map, striped only at the output, uniformly or by ABP) and the *receptive-partitioned*
  (RP) path (the map is cut once at the RP position and the stripes continue as separate
  images, so no stripe can see the others);
* every feature has its own pooling (its own GeM exponent when ``pooling='gem'``), its own
  1x1 conv + BN + ReLU reduction to 256-d and its own classifier. The test descriptor is the
  concatenation of all reduced features.

Feature order (= descriptor order), per branch in the order of ``branches``::

    b{K}.orig.global, b{K}.orig.s1 .. b{K}.orig.sK, b{K}.rp.global, b{K}.rp.s1 .. b{K}.rp.sK

``only_rp`` drops ``b{K}.orig.s*``; ``rp_position='output'`` drops ``b{K}.rp.*``; a K = 1
branch is global-only: ``b1.orig.global`` (its stripe and its RP path would repeat it).

Study switches that are not the paper's (docs/model.md, section 10): ``rp_batchnorm='separate'``
gives the RP path its own BatchNorm layers, ``head='bnneck'`` a BNNeck head, and the runtime
flag ``abp_warmup`` makes training use uniform stripes (set by the trainer's ABP warm-up).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rmgl.model.backbone import ARCHITECTURES, ResNetBackbone, build_backbone
from rmgl.model.partition import (
    POOLINGS,
    GlobalPool,
    abp_boundaries,
    run_partitioned,
    stripe_rows,
    uniform_boundaries,
)
from rmgl.model.receptive_field import (
    RP_POSITIONS,
    current_rp_position,
    rp_position_words,
    stage_fields,
)
from rmgl.model.registry import ModelConfig, register_model
from rmgl.registry import option

ABP_MODES = ("off", "train", "test", "both")
ABP_POOLINGS = ("avg", "max")
RP_BATCHNORMS = ("shared", "separate")
HEADS = ("reduction", "bnneck")


@dataclass
class BranchMaps:
    """Final maps of one branch: ``original`` (N, C, H, W) and, unless there is no RP path,
    ``cut`` (the map where the RP path was cut) and ``partitioned`` (K maps (N, C, H/K, W))."""

    original: Tensor
    cut: Tensor | None = None
    partitioned: list[Tensor] = field(default_factory=list)


@dataclass
class RMGLOutput:
    """What the training losses need: per-feature logits and reduced features (by name, in
    descriptor order) and, per branch, the concatenation of its features (for the triplet)."""

    logits: dict[str, Tensor]
    features: dict[str, Tensor]
    branch_features: dict[str, Tensor]

    @property
    def names(self) -> list[str]:
        return list(self.features)

    @property
    def descriptor(self) -> Tensor:
        """The features concatenated: the eval descriptor for ``head='reduction'`` (with
        ``'bnneck'`` the eval descriptor is their BatchNorm'd version)."""
        return torch.cat(list(self.features.values()), dim=1)


class ReductionHead(nn.Module):
    """1x1 conv + BN + ReLU from the pooled C-d vector to ``dim``, then a linear classifier.

    Separate per feature (as MGN): each stripe of each path learns its own embedding.

    ``bnneck=True`` (not the paper's; the BNNeck of Luo et al.'s strong re-ID baseline): the
    reduction is the 1x1 conv alone, its output is the triplet's feature, and ``neck``, a
    BatchNorm without ReLU whose bias stays 0, gives the classifier's input and the
    descriptor. Without it ``neck`` is the identity: one feature serves all three.
    """

    def __init__(self, in_channels: int, dim: int, num_classes: int, bnneck: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, dim, kernel_size=1, bias=False)]
        if not bnneck:
            layers += [nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
        self.reduction = nn.Sequential(*layers)
        self.neck = nn.BatchNorm1d(dim) if bnneck else nn.Identity()
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.kaiming_normal_(self.reduction[0].weight, mode="fan_in")
        if bnneck:
            self.neck.bias.requires_grad_(False)  # no shift, as in BNNeck
        else:
            nn.init.ones_(self.reduction[1].weight)
            nn.init.zeros_(self.reduction[1].bias)
        # small classifier weights: every softmax starts near uniform (CE ~ log(num_classes))
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        """The reduced feature (N, dim), the triplet's; the caller applies ``neck`` (then
        ``classifier`` in training) for the classifier and the descriptor."""
        return self.reduction(pooled[:, :, None, None]).flatten(1)


class PathBatchNorm(nn.BatchNorm2d):
    """A branch's BatchNorm with a second one, ``rp``, for the receptive-partitioned path
    (``rp_batchnorm='separate'``), so that stripe batches keep their own affine parameters
    and running statistics instead of mixing into the full map's. The original path keeps
    this module's own keys (torchvision's names); ``rp`` starts as a copy of it."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.rp = copy.deepcopy(bn)
        self.use_rp = False  # set by rp_path_batchnorm() while the RP path runs

    def forward(self, x: Tensor) -> Tensor:
        return self.rp(x) if self.use_rp else super().forward(x)


def separate_rp_batchnorm(layer: nn.Module) -> None:
    """Replace every BatchNorm2d of ``layer`` by a :class:`PathBatchNorm`; the convolutions stay
    the same modules, so both paths train the same convolution weights."""
    for name, module in list(layer.named_modules()):
        if type(module) is nn.BatchNorm2d:
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent), attr, PathBatchNorm(module))


@contextmanager
def rp_path_batchnorm(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Route every :class:`PathBatchNorm` in ``modules`` to its RP-path BatchNorm for the block
    (nothing to do when the BatchNorm is shared)."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, PathBatchNorm)]
    for m in norms:
        m.use_rp = True
    try:
        yield
    finally:
        for m in norms:
            m.use_rp = False


class Trunk(nn.Module):
    """Shared ``stem`` + ``layer1`` (torchvision attribute names, so weights load by name)."""

    def __init__(self, backbone: ResNetBackbone) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (
            backbone.conv1,
            backbone.bn1,
            backbone.relu,
            backbone.maxpool,
        )
        self.layer1 = backbone.layer1

    @property
    def stem(self) -> nn.Sequential:
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)


class Branch(nn.Module):
    """One granularity: its own ``layer2..layer4`` and, per feature it produces, one pooling
    operator (``pools``) and one head (``heads``), both keyed by the feature's part name."""

    def __init__(
        self,
        stripes: int,
        backbone: ResNetBackbone,
        num_classes: int,
        reduction_dim: int,
        rp_path: bool,
        only_rp: bool,
        pooling: str = "max",
        stripe_pooling: str = "max",
        rp_batchnorm_layers: Sequence[str] = (),
        bnneck: bool = False,
    ) -> None:
        super().__init__()
        self.stripes = stripes
        # Own copies, initialised from the same weights (the paper's "after res_conv2c").
        self.layer2 = copy.deepcopy(backbone.layer2)
        self.layer3 = copy.deepcopy(backbone.layer3)
        self.layer4 = copy.deepcopy(backbone.layer4)
        self.rp_path = rp_path and stripes > 1
        if self.rp_path:  # only the layers the RP path runs: DDP needs every parameter used
            for name in rp_batchnorm_layers:
                separate_rp_batchnorm(getattr(self, name))
        self.orig_stripes = stripes > 1 and not (only_rp and self.rp_path)
        parts = ["orig_global"]
        if self.orig_stripes:
            parts += [f"orig_s{k}" for k in range(1, stripes + 1)]
        if self.rp_path:
            parts += ["rp_global"] + [f"rp_s{k}" for k in range(1, stripes + 1)]
        # The original path's stripes get the operator chosen for them (ABP's whenever ABP is
        # used in either mode), in training and in test alike; everything else uses `pooling`.
        self.pools = nn.ModuleDict(
            {p: GlobalPool(stripe_pooling if p.startswith("orig_s") else pooling) for p in parts}
        )
        channels = backbone.out_channels
        self.heads = nn.ModuleDict(
            {p: ReductionHead(channels, reduction_dim, num_classes, bnneck) for p in parts}
        )

    @property
    def name(self) -> str:
        return f"b{self.stripes}"

    def feature_names(self) -> list[str]:
        return [f"{self.name}.{p.replace('_', '.')}" for p in self.heads]

    def pool(self, maps: BranchMaps, abp: bool) -> dict[str, Tensor]:
        """Pooled (N, C) vector of every feature, by part name. ``abp`` chooses the original
        path's stripe boundaries (activation balanced or uniform), never their operator."""
        x = maps.original
        pooled = {"orig_global": self.pools["orig_global"](x)}
        if self.orig_stripes:
            if abp:
                masks = stripe_rows(abp_boundaries(x, self.stripes), x.shape[2])
                stripes = [self.pools[f"orig_s{k + 1}"](x, rows) for k, rows in enumerate(masks)]
            else:
                b = uniform_boundaries(x.shape[2], self.stripes)
                stripes = [
                    self.pools[f"orig_s{k + 1}"](x[:, :, b[k] : b[k + 1]])
                    for k in range(self.stripes)
                ]
            pooled.update({f"orig_s{k + 1}": v for k, v in enumerate(stripes)})
        if self.rp_path:
            pooled["rp_global"] = self.pools["rp_global"](torch.cat(maps.partitioned, dim=2))
            for k, m in enumerate(maps.partitioned):
                pooled[f"rp_s{k + 1}"] = self.pools[f"rp_s{k + 1}"](m)
        return pooled


@dataclass
class RMGLConfig(ModelConfig):
    """The RMGL model's options (config section ``model:``); the defaults are the paper's
    (ResNet-50, last stride 1, Local-2 and Local-3 branches, RP after layer1, ABP in training
    and test, max pooling, 256-d, BatchNorm shared by both paths, conv + BN + ReLU heads).

    A new option is a field here (with its choices, and ``architecture=True`` when it changes
    the weights) and its use in :class:`RMGL`: config validation and checkpoint checks read
    the field.
    """

    name: str = "rmgl"
    backbone: str = option("resnet50", choices=tuple(ARCHITECTURES), architecture=True)
    last_stride: int = option(1, architecture=True)
    branches: list[int] = option([2, 3], architecture=True)  # stripe counts K, one per branch
    # where the RP path cuts the map (RP_POSITIONS: input, after_stem, after_layer1, ...,
    # output = no RP path)
    rp_position: str = option("after_layer1", choices=RP_POSITIONS, architecture=True)
    only_rp: bool = option(False, architecture=True)
    abp: str = option("both", choices=ABP_MODES)  # where stripes are activation balanced
    abp_pool: str = option("avg", choices=ABP_POOLINGS)
    pooling: str = option("max", choices=POOLINGS, architecture=True)
    reduction_dim: int = option(256, architecture=True)
    # Study switches; the defaults are the paper's model (docs/model.md, section 10).
    abp_warmup_epochs: int = 0  # uniform stripes in training for the first N epochs, then ABP
    # shared | separate (the RP path's own BatchNorm layers)
    rp_batchnorm: str = option("shared", choices=RP_BATCHNORMS, architecture=True)
    # reduction (conv + BN + ReLU) | bnneck (conv; BN for CE and test)
    head: str = option("reduction", choices=HEADS, architecture=True)

    def __post_init__(self) -> None:
        self.rp_position = current_rp_position(self.rp_position)

    def check(self, prefix: str = "") -> None:
        """Raise ValueError naming the option (after ``prefix``) whose value cannot work."""
        super().check(prefix)
        branches = [int(k) for k in self.branches]
        if not branches or min(branches) < 1 or len(set(branches)) != len(branches):
            raise ValueError(
                f"{prefix}branches={branches} must be distinct stripe counts >= 1, e.g. [2, 3]"
            )
        if self.reduction_dim < 1:
            raise ValueError(f"{prefix}reduction_dim={self.reduction_dim} must be >= 1")
        if self.abp_warmup_epochs < 0:
            raise ValueError(f"{prefix}abp_warmup_epochs={self.abp_warmup_epochs} must be >= 0")
        no_rp = f"{prefix}rp_position=output has none"
        if self.only_rp and self.rp_position == "output":
            raise ValueError(
                f"{prefix}only_rp=true needs a receptive partition; {no_rp} (an output "
                "partition is the original path's stripes): choose an RP position "
                f"({', '.join(p for p in RP_POSITIONS if p != 'output')}) or set "
                f"{prefix}only_rp=false"
            )
        if self.rp_batchnorm == "separate" and self.rp_position == "output":
            raise ValueError(f"{prefix}rp_batchnorm=separate needs a receptive partition; {no_rp}")
        if self.abp_warmup_epochs and self.abp not in ("train", "both"):
            raise ValueError(
                f"{prefix}abp_warmup_epochs={self.abp_warmup_epochs} needs ABP in training "
                f"({prefix}abp=train or both), not {prefix}abp={self.abp}"
            )


class RMGL(nn.Module):
    """Receptive multi-granularity learning network; build it with :func:`build_model` from
    an :class:`RMGLConfig`.

    ``forward`` returns the (N, 256 * num_features) descriptor in eval mode and an
    :class:`RMGLOutput` in training mode.
    """

    def __init__(
        self, backbone: ResNetBackbone, num_classes: int, cfg: RMGLConfig | None = None
    ) -> None:
        super().__init__()
        cfg = cfg or RMGLConfig()
        cfg.check()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        branches = [int(k) for k in cfg.branches]
        rp_position, abp, pooling = cfg.rp_position, cfg.abp, cfg.pooling
        self.arch = backbone.arch
        self.last_stride = backbone.last_stride
        self.num_classes = num_classes
        self.rp_position = rp_position
        self.cut = RP_POSITIONS.index(rp_position)  # the number of stages before the cut
        self.abp = abp
        self.abp_pool = cfg.abp_pool
        self.pooling = pooling
        self.reduction_dim = cfg.reduction_dim
        self.rp_batchnorm = cfg.rp_batchnorm
        self.head = cfg.head
        # Runtime flag, not state: True makes training use uniform stripes (ABP warm-up).
        self.abp_warmup = False
        self.trunk = Trunk(backbone)
        has_rp = rp_position != "output"
        # One operator per head in both modes: with ABP in either mode the original path's
        # stripes are pooled with `abp_pool` also where their boundaries are uniform.
        stripe_pooling = pooling if abp == "off" else cfg.abp_pool
        # The branch layers the RP path runs (the shared trunk keeps its BatchNorm).
        rp_bn_layers = (
            [f"layer{i}" for i in range(max(self.cut, 2), 5)]
            if cfg.rp_batchnorm == "separate"
            else []
        )
        self.branches = nn.ModuleList(
            Branch(
                k,
                backbone,
                num_classes,
                cfg.reduction_dim,
                has_rp,
                cfg.only_rp,
                pooling,
                stripe_pooling,
                rp_bn_layers,
                cfg.head == "bnneck",
            )
            for k in branches
        )

    # ----------------------------------------------------------------------------- structure
    @property
    def feature_names(self) -> list[str]:
        """Names of the 256-d features in descriptor order."""
        return [name for branch in self.branches for name in branch.feature_names()]

    @property
    def descriptor_dim(self) -> int:
        return self.reduction_dim * len(self.feature_names)

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters the optimizer must not weight-decay: the GeM exponents.
        Decay would drag each p towards 0 (below average pooling) whatever the loss asks for."""
        return {
            f"{name}.p"
            for name, module in self.named_modules()
            if isinstance(module, GlobalPool) and module.p is not None
        }

    def stages(self, branch: Branch) -> list[tuple[str, nn.Module]]:
        """The five stages one branch's images go through (the first two are shared)."""
        return [
            ("stem", self.trunk.stem),
            ("layer1", self.trunk.layer1),
            ("layer2", branch.layer2),
            ("layer3", branch.layer3),
            ("layer4", branch.layer4),
        ]

    def working_heights(self, near: int, count: int = 6) -> list[int]:
        """Input heights close to ``near``, multiples of the stride at the RP cut, whose map at
        the cut divides by every branch's K."""
        stages = self.stages(self.branches[0])[: self.cut]
        ks = [b.stripes for b in self.branches if b.rp_path]
        stride = stage_fields(stages, near, 8)[-1].stride
        found = []
        candidates = range(stride, 2 * near + 64 * stride, stride)
        for h in sorted(candidates, key=lambda h: (abs(h - near), h)):
            rows = stage_fields(stages, h, 8)[-1].height
            if rows > 0 and all(rows % k == 0 for k in ks):
                found.append(h)
            if len(found) == count:
                break
        return sorted(found)

    # ------------------------------------------------------------------------------ forward
    def branch_maps(self, images: Tensor) -> list[BranchMaps]:
        """Final maps of both paths of every branch (exposed so tests can probe locality)."""
        x = images
        trunk_inputs = [x]  # trunk_inputs[i] = input of stage i, for i = 0 (stem), 1, 2
        for module in (self.trunk.stem, self.trunk.layer1):
            x = module(x)
            trunk_inputs.append(x)
        result = []
        for branch in self.branches:
            layers = [m for _, m in self.stages(branch)]
            inputs = list(trunk_inputs)
            y = inputs[-1]
            for module in layers[2:]:
                y = module(y)
                inputs.append(y)  # inputs[i] = input of stage i; inputs[5] = final map
            maps = BranchMaps(original=inputs[5])
            if branch.rp_path:
                maps.cut = inputs[self.cut]
                self._check_divisible(maps.cut, branch.stripes, images.shape[2])
                with rp_path_batchnorm(layers[self.cut :]):
                    maps.partitioned = run_partitioned(layers[self.cut :], maps.cut, branch.stripes)
            result.append(maps)
        return result

    def _check_divisible(self, cut_map: Tensor, stripes: int, input_height: int) -> None:
        rows = cut_map.shape[2]
        if rows % stripes:
            raise ValueError(
                f"the map {rp_position_words(self.rp_position)} has {rows} rows for an input of height "
                f"{input_height}, not divisible by K={stripes}; input heights that work: "
                f"{self.working_heights(input_height)}"
            )

    def _use_abp(self) -> bool:
        if self.training and self.abp_warmup:
            return False
        return self.abp == "both" or self.abp == ("train" if self.training else "test")

    def forward(self, images: Tensor) -> Tensor | RMGLOutput:
        use_abp = self._use_abp()
        features: dict[str, Tensor] = {}  # the triplet's features
        necks: dict[str, Tensor] = {}  # the classifiers' inputs and the descriptor
        for branch, maps in zip(self.branches, self.branch_maps(images), strict=True):
            pooled = branch.pool(maps, use_abp)
            for part, head in branch.heads.items():
                name = f"{branch.name}.{part.replace('_', '.')}"
                features[name] = head(pooled[part])
                necks[name] = head.neck(features[name])
        if not self.training:
            return torch.cat(list(necks.values()), dim=1)
        logits, branch_features = {}, {}
        for branch in self.branches:
            names = branch.feature_names()
            for name, head in zip(names, branch.heads.values(), strict=True):
                logits[name] = head.classifier(necks[name])
            branch_features[branch.name] = torch.cat([features[n] for n in names], dim=1)
        return RMGLOutput(logits=logits, features=features, branch_features=branch_features)


@register_model("rmgl", config=RMGLConfig)
def build_rmgl(cfg: RMGLConfig, num_classes: int) -> RMGL:
    """The RMGL model of ``cfg`` on its backbone (``cfg.pretrained``'s weights)."""
    cfg.check()
    return RMGL(build_backbone(cfg.backbone, cfg.pretrained, cfg.last_stride), num_classes, cfg)
