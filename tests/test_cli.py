"""The ``rmgl`` command: synth, then data-info on its output; user errors without tracebacks."""

import subprocess
import sys

from rmgl.cli import main


def test_synth_then_data_info(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["synth", "--out", str(out), "--train-ids", "12", "--test-ids", "10", "--scale", "1", "--workers", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["data-info", "folder", "--root", str(out)]) == 0
    table = capsys.readouterr().out
    assert "train" in table and "query" in table and "gallery" in table
    train_row = next(line for line in table.splitlines() if line.strip().startswith("train"))
    assert train_row.split()[1] == "12"  # identities


def test_data_info_wrong_root_is_a_clear_error(tmp_path, capsys):
    assert main(["data-info", "market1501", "--root", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "bounding_box_train" in err and "Traceback" not in err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "rmgl.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "synth" in result.stdout and "data-info" in result.stdout
