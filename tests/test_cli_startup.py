"""The command line itself: help without torch, --version, defaults in every option's help,
one override syntax (KEY=VALUE; the deprecated --set still accepted, with a warning) and
``rmgl configs``."""

import argparse
import subprocess
import sys
import textwrap

import pytest
import yaml

import rmgl
from rmgl.cli import all_parsers, build_parser, main, shows_default

HELP_EVERYWHERE = textwrap.dedent(
    """
    import contextlib, io, sys
    from rmgl.cli import all_parsers, build_parser
    parser = build_parser()
    for sub in all_parsers(parser):
        sub.format_help()
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(["train", "--help"])
        except SystemExit:
            pass
    heavy = sorted(m for m in ("torch", "torchvision", "numpy", "omegaconf", "matplotlib") if m in sys.modules)
    print("heavy:", heavy)
    """
)


def test_help_of_every_command_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-c", HELP_EVERYWHERE], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "heavy: []", result.stdout + result.stderr


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "rmgl.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == f"rmgl {rmgl.__version__}"


def test_the_help_choices_are_the_librarys():
    from rmgl.cli import choices
    from rmgl.data.datasets import READERS
    from rmgl.data.records import PROTOCOLS
    from rmgl.data.synthetic import PRESETS
    from rmgl.metrics.distance import METRICS
    from rmgl.model.backbone import ARCHITECTURES
    from rmgl.model.receptive_field import DEPRECATED_RP_POSITIONS, RP_POSITIONS

    assert choices.DATASETS == tuple(READERS)
    assert choices.REALISM_PRESETS == tuple(PRESETS)
    assert choices.BACKBONES == tuple(sorted(ARCHITECTURES))
    assert choices.RP_POSITIONS == RP_POSITIONS
    assert choices.DEPRECATED_RP_POSITIONS == tuple(DEPRECATED_RP_POSITIONS)
    assert choices.PROTOCOLS == PROTOCOLS
    assert choices.METRICS == METRICS


def test_every_option_with_a_default_shows_it():
    parsers = all_parsers(build_parser())
    assert len(parsers) > 15
    checked = 0
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if shows_default(action) and action.help != argparse.SUPPRESS:
                text = formatter._expand_help(action)
                assert "default" in text.lower(), (parser.prog, action.option_strings, text)
                checked += 1
    assert checked > 50


def test_train_help_shows_the_default_of_an_option_without_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = capsys.readouterr().out
    assert "--train-ids TRAIN_IDS" in out and "(default: 100)" in out
    assert "--seed SEED           (default: 0)" in out


def test_sweep_takes_key_value_overrides_after_the_configs(capsys):
    # the typo is reported as an override: it was not read as a config name
    assert main(["sweep", "demo", "optim.epoch=2"]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'optim.epochs'?" in err and "warning" not in err


@pytest.mark.parametrize(
    "argv, new_form, message",
    [
        (
            ["sweep", "demo", "--set", "optim.epoch=2", "run.seed=1"],
            "rmgl sweep demo optim.epoch=2 run.seed=1",
            "did you mean 'optim.epochs'?",
        ),
        (
            ["train", "demo", "--set", "optim.epochs=0", "--resume"],
            "rmgl train demo --resume optim.epochs=0",
            "optim.epochs=0 must be >= 1",
        ),
        (
            ["synth", "--out", "x", "--set", "nosuch.prob=1", "--set", "occlusion.prob=1"],
            "rmgl synth --out x nosuch.prob=1 occlusion.prob=1",
            "unknown knob group 'nosuch'",
        ),
    ],
)
def test_the_old_set_forms_still_work_with_a_warning(argv, new_form, message, capsys):
    assert main(argv) == 1  # each fails on its override: the override was applied
    err = capsys.readouterr().err
    command = argv[0]
    assert f"rmgl {command}: warning: --set is deprecated" in err
    assert err.splitlines()[0].endswith(new_form)
    assert message in err and "Traceback" not in err


def test_configs_lists_without_cutting_words(capsys):
    from rmgl.engine.config import builtin_configs, find_config

    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    names = builtin_configs()
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
            rows[name] = [line[len(name) :].strip()]
        else:
            rows[name].append(line.strip())
    assert list(rows) == names
    for name in names:
        first = find_config(name).read_text().splitlines()[0]
        summary = first.lstrip("# ").strip() if first.startswith("#") else ""
        assert " ".join(rows[name]).strip() == " ".join(summary.split()), name
        assert all(len(line) <= 100 for line in out.splitlines())


def test_configs_name_prints_the_resolved_config(capsys):
    from rmgl.engine.config import load_config, to_yaml

    assert main(["configs", "demo", "optim.epochs=7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# demo optim.epochs=7, resolved")
    resolved = yaml.safe_load(out)
    assert resolved == yaml.safe_load(to_yaml(load_config("demo", ["optim.epochs=7"])))
    assert resolved["optim"]["epochs"] == 7 and resolved["data"]["num_identities"] == 8
    assert "lr" in resolved["optim"]  # a default the file does not set
    assert main(["configs", "demo", "--source"]) == 0
    assert capsys.readouterr().out.startswith("# CPU-sized RMGL")
