"""``rmgl eval`` and ``rmgl report`` name their data as ``rmgl train`` does
(``data.dataset=NAME data.root=DIR``), default to the data the checkpoint was trained on, and
still take the former ``--dataset/--root`` with a warning that shows the new form."""

import json
import shutil

import pytest

from rmgl.cli import main
from rmgl.cli.overrides import new_form

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _eval(checkpoint, out, *data: str) -> dict:
    argv = ["eval", "--checkpoint", str(checkpoint), *data, "--out", str(out), "--workers", "0"]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_new_form_old_form_and_default_name_the_same_data(
    tiny_checkpoint, tiny_data, tmp_path, capsys
):
    # a copy without one query image: a result that can only come from this root
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    sorted((other / "query").glob("*.jpg"))[0].unlink()

    new = _eval(tiny_checkpoint, tmp_path / "new", "data.dataset=folder", f"data.root={other}")
    assert "warning" not in capsys.readouterr().err
    old = _eval(tiny_checkpoint, tmp_path / "old", "--dataset", "folder", f"--root={other}")
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1, err
    assert err[0].startswith("rmgl eval: warning: --dataset and --root are deprecated")
    assert err[0].endswith(
        f"rmgl eval --checkpoint {tiny_checkpoint} data.dataset=folder data.root={other} "
        f"--out {tmp_path / 'old'} --workers 0"
    )
    assert new["provenance"]["root"] == old["provenance"]["root"] == str(other)
    assert new["results"] == old["results"]

    # no KEY=VALUE: the checkpoint's own data.dataset and data.root (tiny_data)
    own = _eval(tiny_checkpoint, tmp_path / "own")
    assert own["provenance"]["dataset"] == "folder"
    assert own["provenance"]["root"] == str(tiny_data)
    queries = len(list((tiny_data / "query").glob("*.jpg")))
    assert _queries(own) == queries and _queries(new) == queries - 1


def _queries(saved: dict) -> int:
    plain = saved["results"]["plain"]
    return plain["num_valid_queries"] + plain["num_skipped_queries"]


def test_report_takes_the_new_form(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "page.html"
    argv = ["report", "--checkpoint", str(tiny_checkpoint), f"data.root={tiny_data}"]
    assert main([*argv, "--out", str(out), "--worst", "1", "--workers", "0"]) == 0
    assert out.is_file()


@pytest.mark.parametrize(
    "item, message",
    [
        ("model.backbone=resnet50", "KEY=VALUE arguments name the data only: data.dataset and"),
        ("eval.rerank=true", "the checkpoint's eval.rerank is chosen here with --rerank"),
        ("data.workers=0", "is chosen here with --workers"),
        ("data.root=", "data.root=: give a value, e.g. data.root=/data/market1501"),
        ("data.dataset=market1501", "not the dataset the checkpoint was trained on (folder)"),
    ],
)
def test_other_keys_are_refused_in_one_line(item, message, tiny_checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), item]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rmgl eval: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_new_form_rewrites_renamed_options_in_place():
    renamed = {"--dataset": "data.dataset", "--root": "data.root"}
    argv = ["eval", "--checkpoint", "ck", "--dataset", "folder", "--root=/a b", "--rerank"]
    assert new_form(argv, renamed) == (
        "rmgl eval --checkpoint ck data.dataset=folder 'data.root=/a b' --rerank"
    )


def test_a_dataset_named_by_an_alias_is_the_same_dataset():
    from rmgl.data.datasets import same_dataset

    assert same_dataset("market", "Market-1501") and same_dataset("synthetic", "folder")
    assert not same_dataset("market1501", "dukemtmcreid")
