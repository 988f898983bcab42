"""rmgl as a library: load_model, fine-tuning (model.init_from), callbacks, the run record's
rules (run names, resume with changed settings), config value checks, seeds tables."""

import json
from pathlib import Path

import pytest
import torch

from rmgl.engine import Callback, ConfigError, Trainer, load_config, load_model
from rmgl.engine.config import check_resume_changes
from rmgl.engine.load import init_from_checkpoint, model_config
from rmgl.engine.run_record import check_run_name
from rmgl.engine.runtime import amp_dtype
from rmgl.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "data.dataset=folder",
    "data.height=48",
    "data.width=16",
    "data.num_identities=4",
    "data.num_instances=2",
    "data.workers=0",
    "data.test_batch_size=64",
    "model.backbone=resnet18",
    "model.pretrained=none",
    # one K = 2 branch of 32-d features: what these tests check does not need the paper's size
    "model.branches=[2]",
    "model.reduction_dim=32",
    "optim.epochs=1",
    "optim.warmup_epochs=1",
    "optim.milestones=[2]",
    "eval.every=0",
    "run.log_every=1",
]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One tiny trained run shared by the tests that only read its checkpoint."""
    out = tmp_path_factory.mktemp("lib_runs")
    cfg = load_config(
        None, [*TINY, f"data.root={tiny_data}", f"run.output_dir={out}", "run.name=base"]
    )
    with Trainer(cfg, progress=False) as trainer:
        results = trainer.train()
    return out / "base", results


def test_load_model_rebuilds_the_trained_model(trained, tiny_data):
    run, results = trained
    model = load_model(run / "last.safetensors", device="cpu")
    assert not model.training
    assert model.preprocess.size == (48, 16) and model.preprocess.flip
    assert model.config.model.backbone == "resnet18" and model.checkpoint.endswith(
        "last.safetensors"
    )
    from rmgl.data.datasets import load_dataset
    from rmgl.engine.evaluation import evaluate_model

    again = evaluate_model(
        model, load_dataset("folder", tiny_data), model.preprocess.size, workers=0, progress=False
    )
    assert again["plain"].mAP == pytest.approx(results["plain"].mAP, abs=1e-6)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "not a readable rmgl checkpoint"),
        (b"\x00" * 64, "not a readable rmgl checkpoint"),
    ],
)
def test_load_model_rejects_files_that_are_not_checkpoints(tmp_path, content, expected):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        load_model(tmp_path)


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    run, _ = trained
    data = (run / "last.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable rmgl checkpoint"):
        load_model(cut)


def test_init_from_loads_the_backbone_and_resets_classifiers_of_another_class_count(trained):
    run, _ = trained
    cfg = load_config(None, [*TINY, "data.root=unused"])
    model = build_model(model_config(cfg), 11)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    message = init_from_checkpoint(model, cfg.model, run / "last.safetensors")
    trained_state = load_model(run / "last.safetensors").state_dict()
    n_classifiers = len(model.feature_names)
    assert (
        f"{n_classifiers} classifiers start fresh (8 identities in the checkpoint, 11 here"
        in message
    )
    for name, value in model.state_dict().items():
        if ".classifier." in name:
            assert torch.equal(value, fresh[name]), name  # kept its own initialisation
        else:
            assert torch.equal(value, trained_state[name]), name


def test_init_from_another_architecture_names_the_mismatch(trained):
    run, _ = trained
    cfg = load_config(None, [*TINY, "data.root=unused", "model.branches=[2,3]"])
    model = build_model(model_config(cfg), 8)
    with pytest.raises(
        ValueError,
        match=r"another architecture \(branches: checkpoint \[2\] vs config \[2, 3\]\)",
    ):
        init_from_checkpoint(model, cfg.model, run / "last.safetensors")


@pytest.mark.parametrize("same_identities", [False, True])
def test_fine_tuning_run_starts_from_the_checkpoint(
    trained, tiny_data, tmp_path, caplog, same_identities
):
    """Same class count: the classifiers still start fresh (class i of other data is another
    person) unless model.init_from_same_identities says the identities are the same."""
    run, _ = trained
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.root={tiny_data}",
            f"run.output_dir={tmp_path}",
            "run.name=ft",
            f"model.init_from={run / 'last.safetensors'}",
            f"model.init_from_same_identities={str(same_identities).lower()}",
            "optim.lr=1e-9",
            "optim.warmup_start_lr=1e-12",
        ],
    )
    with caplog.at_level("INFO", logger="rmgl"):
        with Trainer(cfg, progress=False) as trainer:
            start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert "model.init_from: loaded" in caplog.text
    trained_state = load_model(run / "last.safetensors").state_dict()
    classifiers = [k for k in start if ".classifier." in k]
    assert classifiers and all(
        torch.equal(start[k], trained_state[k]) for k in start if k not in classifiers
    )
    kept = [torch.equal(start[k], trained_state[k]) for k in classifiers]
    if same_identities:
        assert all(kept) and "classifiers kept (the same 8 identities)" in caplog.text
    else:
        assert not any(kept) and "classifiers start fresh" in caplog.text


def test_same_identities_needs_the_same_class_count_and_an_init_from(trained):
    run, _ = trained
    with pytest.raises(ConfigError, match="init_from_same_identities=true keeps the classifiers"):
        load_config(None, [*TINY, "data.root=unused", "model.init_from_same_identities=true"])
    cfg = load_config(
        None,
        [
            *TINY,
            "data.root=unused",
            f"model.init_from={run / 'last.safetensors'}",
            "model.init_from_same_identities=true",
        ],
    )
    model = build_model(model_config(cfg), 11)
    with pytest.raises(ValueError, match="trained on 8 identities and this data has 11"):
        init_from_checkpoint(model, cfg.model, run / "last.safetensors")


def test_data_mean_and_std_reach_training_and_evaluation(tiny_data, tmp_path):
    """data.mean/std normalise the training batches and the trainer's evaluation inputs."""
    from rmgl.data.loading import read_image
    from rmgl.data.transforms import build_eval_transform

    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.root={tiny_data}",
            f"run.output_dir={tmp_path}",
            f"data.mean={list(mean)}",
            f"data.std={list(std)}",
            "data.augment.flip=0",
            "data.augment.rsa=0",
        ],
    )
    with Trainer(cfg, progress=False) as trainer:
        train_transform = trainer.loader.dataset.transform
        assert trainer.preprocess.mean == mean and trainer.preprocess.std == std
        seen = []
        handle = trainer.model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        trainer.evaluate()
        handle.remove()
    raw = read_image(trainer.dataset.query[0].path)
    expected = build_eval_transform((48, 16), mean, std)(raw)
    torch.testing.assert_close(seen[0][0], expected)  # the first query, unflipped
    torch.testing.assert_close(train_transform(raw), expected)  # no augmentation: the same


def test_resume_with_another_protocol_forgets_the_best_map_and_says_so(
    trained, tiny_data, tmp_path
):
    """best.safetensors is chosen by comparing mAPs; one measured under the cross-camera
    protocol must not be compared with any-camera ones after a resume that changes it."""
    import shutil

    from rmgl.engine.load import read_checkpoint

    run, results = trained
    shutil.copytree(run, tmp_path / "base")
    resume = [
        *TINY,
        f"data.root={tiny_data}",
        f"run.output_dir={tmp_path}",
        "run.name=base",
        "optim.epochs=2",
    ]
    with Trainer(load_config(None, resume), resume=True, progress=False) as trainer:
        assert trainer.best_map == pytest.approx(results["plain"].mAP)  # same setting: kept
    changed = load_config(None, [*resume, "eval.protocol=any_camera"])
    with Trainer(changed, resume=True, progress=False) as trainer:
        assert trainer.best_map == -1.0
        trainer.train()
    # replaced by the first any-camera evaluation, whatever its mAP
    assert read_checkpoint(tmp_path / "base" / "best.safetensors").trainer["epoch"] == 1
    log = (tmp_path / "base" / "train.log").read_text()
    assert "resumed with eval.protocol cross_camera -> any_camera: the best mAP so far" in log
    rows = [json.loads(line) for line in (tmp_path / "base" / "evaluations.jsonl").open()]
    assert rows[-1]["protocol"] == "any_camera" and rows[-1]["metric"] == "euclidean"


class Counter(Callback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer):
        self.calls.append("start")

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(("epoch_start", epoch))

    def on_step_end(self, trainer, step):
        self.calls.append(("step", step.epoch, step.iteration, step.global_step))
        assert set(step.losses) >= {"loss"} and step.lr > 0 and len(step.pids) == 8

    def on_epoch_end(self, trainer, epoch, summary):
        assert trainer.record.last.is_file(), "the epoch is saved before callbacks run"
        self.calls.append(("epoch", epoch))

    def on_train_end(self, trainer):
        self.calls.append("end")


def test_callbacks_are_called_in_order(tiny_data, tmp_path):
    counter = Counter()
    cfg = load_config(
        None, [*TINY, f"data.root={tiny_data}", f"run.output_dir={tmp_path}", "optim.epochs=2"]
    )
    with Trainer(cfg, progress=False, callbacks=[counter]) as trainer:
        trainer.train()
        n = trainer.iters_per_epoch
    steps = [c for c in counter.calls if isinstance(c, tuple) and c[0] == "step"]
    assert counter.calls[0] == "start" and counter.calls[-1] == "end"
    assert [s[3] for s in steps] == list(range(2 * n))
    assert counter.calls[1] == ("epoch_start", 0) and counter.calls.index(("epoch", 0)) == 2 + n
    assert counter.calls[3 + n] == ("epoch_start", 1) and ("epoch", 1) in counter.calls


def test_failed_evaluation_keeps_the_epoch(tiny_data, tmp_path):
    class Boom(Callback):
        def on_epoch_end(self, trainer, epoch, summary):
            raise ValueError("evaluation failed")

    cfg = load_config(None, [*TINY, f"data.root={tiny_data}", f"run.output_dir={tmp_path}"])
    with (
        Trainer(cfg, progress=False, callbacks=[Boom()]) as trainer,
        pytest.raises(ValueError, match="evaluation failed"),
    ):
        trainer.train()
    from rmgl.engine.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "rmgl" / "last.safetensors").trainer["epoch"] == 0


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", " x"])
def test_run_names_that_could_escape_the_output_folder_are_refused(name):
    with pytest.raises(ValueError, match="not a usable run name"):
        check_run_name(name)
    with pytest.raises(ConfigError, match="not a usable run name"):
        load_config(None, [f"run.name={name}"])


def test_overwrite_only_removes_the_runs_own_folder(tiny_data, tmp_path):
    (tmp_path / "other_run").mkdir()
    (tmp_path / "other_run" / "keep.txt").write_text("mine")
    cfg = load_config(
        None, [*TINY, f"data.root={tiny_data}", f"run.output_dir={tmp_path}", "run.name=x"]
    )
    Trainer(cfg, progress=False).close()
    with pytest.raises(FileExistsError, match="an earlier run that has no checkpoint"):
        Trainer(cfg, progress=False)
    Trainer(cfg, progress=False, overwrite=True).close()
    assert (tmp_path / "other_run" / "keep.txt").read_text() == "mine"


def test_resume_refuses_settings_that_change_the_run(trained, tiny_data):
    run, _ = trained
    saved = load_config(None, [*TINY, "data.root=x"])
    check_resume_changes(
        saved, load_config(None, [*TINY, "data.root=y", "optim.epochs=3", "eval.every=1"]), 1
    )
    with pytest.raises(
        ConfigError,
        match=r"optim.lr: 0.01 -> 0.02.*data.height: 48 -> 64|data.height: 48 -> 64.*optim.lr",
    ):
        check_resume_changes(
            saved, load_config(None, [*TINY, "data.root=x", "optim.lr=0.02", "data.height=64"]), 1
        )
    with pytest.raises(ConfigError, match="already trained 1 epochs and optim.epochs is 1"):
        check_resume_changes(saved, saved, 1)
    # a refused resume leaves the run's record untouched
    before = (run / "config.yaml").read_text()
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.root={tiny_data}",
            f"run.output_dir={run.parent}",
            "run.name=base",
            "optim.epochs=2",
            "model.backbone=resnet34",
        ],
    )
    with pytest.raises(ConfigError, match="model.backbone: resnet18 -> resnet34"):
        Trainer(cfg, resume=True, progress=False)
    assert (run / "config.yaml").read_text() == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.epochs=0", "optim.epochs=0 must be >= 1"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0 must be >= 0"),
        ("data.augment.rsa=1.5", "data.augment.rsa=1.5 must be a probability in \\[0, 1\\]"),
        ("data.height=0", "data.height=0 must be > 0"),
        ("loss.label_smoothing=1", "loss.label_smoothing=1.0 must be in \\[0, 1\\)"),
        ("run.log_every=0", "run.log_every=0 must be >= 1"),
        ("eval.metric=bogus", "eval.metric='bogus' is not one of"),
        ("eval.protocol=nope", "eval.protocol='nope' is not one of"),
        ("model.pooling=median", "model.pooling='median' is not one of"),
        ("data.test_batch_size=0", "data.test_batch_size=0 must be >= 1"),
    ],
)
def test_bad_values_fail_when_the_config_is_loaded(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_only_rp_at_the_output_is_refused():
    with pytest.raises(ConfigError, match="only_rp=true needs a receptive partition"):
        load_config(None, ["model.only_rp=true", "model.rp_position=output"])


def test_evaluation_precision_is_float32_unless_asked():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (
        amp_dtype("auto", gpu) == torch.bfloat16 and amp_dtype("auto", gpu, evaluation=True) is None
    )
    assert (
        amp_dtype("auto", cpu) is None and amp_dtype("bf16", cpu, evaluation=True) == torch.bfloat16
    )
    assert (
        amp_dtype("fp16", gpu, evaluation=True) == torch.float16 and amp_dtype("off", gpu) is None
    )
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        amp_dtype("fp16", cpu)


def test_seeds_table_reports_mean_and_spread():
    from rmgl.metrics import RankResult
    from rmgl.reporting import seeds_table

    def result(r1, ap):
        return RankResult(
            cmc=torch.tensor([r1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]).numpy(),
            mAP=ap,
            mINP=0.1,
            num_valid_queries=10,
            num_skipped_queries=0,
        )

    runs = {
        "a": [
            {"results": {"plain": result(0.5, 0.4)}, "seconds": 10},
            {"results": {"plain": result(0.7, 0.6)}, "seconds": 20},
        ]
    }
    row = seeds_table(runs).splitlines()[2]
    # mean 60.0, sample standard deviation of (50, 70) = 14.1; mAP 50.0 ± 14.1
    assert row.startswith(
        "| a | plain | 2 | 60.0 ± 14.1 | 100.0 ± 0.0 | 100.0 ± 0.0 | 50.0 ± 14.1 | 10.0 ± 0.0 | 15 |"
    )


def test_results_json_round_trip(tmp_path):
    from rmgl.metrics import RankResult
    from rmgl.reporting import write_results_json

    r = RankResult(
        cmc=torch.ones(3).numpy(), mAP=0.5, mINP=0.25, num_valid_queries=2, num_skipped_queries=1
    )
    path = write_results_json(
        tmp_path / "r" / "results.json", {"plain": r}, checkpoint="ck", protocol="any_camera"
    )
    saved = json.loads(path.read_text())
    assert saved["provenance"] == {"checkpoint": "ck", "protocol": "any_camera"}
    assert saved["results"]["plain"]["mAP"] == 0.5 and not list(
        tmp_path.joinpath("r").glob("*.tmp")
    )


def test_train_and_evaluate_data_without_cameras(tiny_data, tmp_path):
    """Per-identity folders from one camera: rejected by the cross-camera protocol, trained and
    evaluated with any_camera (the protocol is the dataset's own, recorded in results.json)."""
    import shutil

    from rmgl.data.datasets import load_dataset

    market = load_dataset("folder", tiny_data)
    root = tmp_path / "by_id"
    for split, records in market.splits().items():
        for r in records:
            if r.pid > 0:
                (root / split / f"id{r.pid:03d}").mkdir(parents=True, exist_ok=True)
                shutil.copy(r.path, root / split / f"id{r.pid:03d}" / Path(r.path).name)
    cfg = load_config(
        None,
        [
            *TINY,
            "data.dataset=identity_folders",
            f"data.root={root}",
            f"run.output_dir={tmp_path / 'runs'}",
        ],
    )
    with Trainer(cfg, progress=False) as trainer:
        assert trainer.dataset.protocol == "any_camera"
        results = trainer.train()
    assert results["plain"].protocol == "any_camera" and results["plain"].num_valid_queries > 0
    saved = json.loads((tmp_path / "runs" / "rmgl" / "eval" / "results.json").read_text())
    assert saved["provenance"]["protocol"] == "any_camera"
    strict = load_config(
        None,
        [
            *TINY,
            "data.dataset=identity_folders",
            f"data.root={root}",
            f"run.output_dir={tmp_path / 'runs2'}",
            "eval.protocol=cross_camera",
        ],
    )
    with Trainer(strict, progress=False) as trainer, pytest.raises(ValueError, match="any_camera"):
        trainer.train()


def test_gem_exponents_are_not_weight_decayed():
    from rmgl.engine.schedule import build_optimizer

    cfg = load_config(None, [*TINY, "data.root=unused", "model.pooling=gem"])
    model = build_model(model_config(cfg), 5)
    optimizer = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {
        names[id(p)]
        for g in optimizer.param_groups
        if g["weight_decay"] == 0.0
        for p in g["params"]
    }
    assert exempt == model.no_weight_decay() and exempt and all(n.endswith(".p") for n in exempt)
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert sum(len(g["params"]) for g in decayed) + len(exempt) == len(names)
    heads = [g for g in optimizer.param_groups if g["name"] == "heads"]
    assert heads and heads[0]["lr"] == cfg.optim.lr * cfg.optim.head_lr_mult
