"""The ``rmgl`` command: synth, then data-info on its output; user errors without tracebacks."""

import subprocess
import sys

import pytest

from rmgl.cli import main


def test_synth_then_data_info(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "synth",
                "--out",
                str(out),
                "--train-ids",
                "12",
                "--test-ids",
                "10",
                "--scale",
                "1",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert main(["data-info", "folder", f"data.root={out}"]) == 0
    table = capsys.readouterr().out
    assert "train" in table and "query" in table and "gallery" in table
    train_row = next(line for line in table.splitlines() if line.strip().startswith("train"))
    assert train_row.split()[1] == "12"  # identities


def test_data_info_takes_the_data_keys_and_the_old_root_option(synth_dir, capsys):
    assert main(["data-info", "folder", f"data.root={synth_dir}"]) == 0
    table = capsys.readouterr().out
    assert "train" in table and "gallery" in table
    assert main(["data-info", "data.dataset=folder", f"data.root={synth_dir}"]) == 0
    assert capsys.readouterr().out == table
    assert main(["data-info", "folder", "--root", str(synth_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out == table
    assert "--root is deprecated" in captured.err
    assert f"rmgl data-info folder data.root={synth_dir}" in captured.err
    assert main(["data-info", "folder"]) == 1
    err = capsys.readouterr().err
    assert "rmgl data-info market1501 data.root=/data/market1501" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["data-info", "folder", "optim.epochs=2"]) == 1
    assert "name the data only" in capsys.readouterr().err


def test_data_info_wrong_root_is_a_clear_error(tmp_path, capsys):
    assert main(["data-info", "market1501", f"data.root={tmp_path / 'missing'}"]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "bounding_box_train" in err and "Traceback" not in err


def test_console_script_help():
    """--help answers without importing Ray (-X importtime lists every import)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rmgl.cli", "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "synth" in result.stdout and "data-info" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert "rmgl" in imported and "ray" not in imported, sorted(imported)


def test_configs_lists_and_prints_builtin_configs(capsys):
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert "market1501" in listing and "ablation/2stripe_rp" in listing and "demo" in listing
    assert main(["configs", "market1501"]) == 0
    assert "dataset: market1501" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "no_such_config"],
            "rmgl train: error: config no_such_config is neither a file nor a built-in config",
        ),
        (["train", "demo", "run.name="], "rmgl train: error: run.name='' is not a usable run name"),
        (["train", "demo", "optim.epoch=3"], "did you mean 'optim.epochs'?"),
        (["train", "demo", "optim.epochs=0"], "rmgl train: error: optim.epochs=0 must be >= 1"),
        (["sweep", "demo", "--seeds", "0"], "rmgl sweep: error: --seeds must be >= 1"),
        (
            ["eval", "--checkpoint", "missing.safetensors", "data.dataset=folder", "data.root=."],
            "rmgl eval: error: checkpoint missing.safetensors does not exist",
        ),
        (["demo", "--scale", "0"], "rmgl demo: error: --scale must be > 0"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_verbose_shows_the_traceback(capsys):
    assert main(["-v", "train", "no_such_config"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_eval_default_folders_differ_per_checkpoint_dataset_and_root(tmp_path):
    from rmgl.cli.evaluate import default_out_dir

    ck = tmp_path / "run" / "best.safetensors"
    folders = {
        default_out_dir(ck, "folder", tmp_path / "a"),
        default_out_dir(ck, "folder", tmp_path / "b"),
        default_out_dir(ck, "market1501", tmp_path / "a"),
        default_out_dir(tmp_path / "run" / "last.safetensors", "folder", tmp_path / "a"),
    }
    assert len(folders) == 4 and all(f.parent == tmp_path / "run" for f in folders)
