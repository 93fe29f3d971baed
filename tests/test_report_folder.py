"""The report writer never deletes what it did not verify: a report is built beside `--out` and
moved into place at the end; without overwrite nothing at `--out` is replaced, whenever it
appeared; with overwrite only a folder holding a report at that moment is."""

from __future__ import annotations

import json
import threading

import pytest
from hf_models import qwen2_moe_config
from tiny import tiny_model

import moe_hooked.report
from moe_hooked import HookedMoETransformer
from moe_hooked.cli import main
from moe_hooked.report import ReportError, build_report
from moe_hooked.report_folder import publish

TEXTS = {"one": ["The cat sat on the mat.", "Routers send each token to a few experts."]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    tiny_model(qwen2_moe_config(), folder, seed=5)
    return folder


def run(model_dir, out, overwrite=False):
    return build_report(str(model_dir), TEXTS, out, max_tokens=16, batch_size=2, overwrite=overwrite, progress=False)


def finished_report(folder):
    """A stand-in for a finished report folder, as `publish` receives it."""
    folder.mkdir()
    (folder / "report.json").write_text("{}")
    (folder / "index.html").write_text("new")
    return folder


def user_folder(path, content="mine"):
    path.mkdir()
    (path / "notes.txt").write_text(content)
    return path


def test_two_reports_on_the_same_out_one_wins_nothing_is_lost(model_dir, tmp_path, monkeypatch):
    """Both pass the upfront checks and run; the first to finish moves its report in, the other
    fails with a clear error and keeps its own report beside it."""
    out = tmp_path / "out"
    both_finished = threading.Barrier(2, timeout=300)

    def publish_together(*args, **kwargs):
        both_finished.wait()
        return publish(*args, **kwargs)

    monkeypatch.setattr(moe_hooked.report, "publish", publish_together)
    outcomes = []

    def worker():
        try:
            outcomes.append(run(model_dir, out))
        except ReportError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [o for o in outcomes if isinstance(o, ReportError)]
    assert outcomes.count(out) == 1 and len(errors) == 1
    assert "appeared while the report was being written" in str(errors[0]) and "it was not replaced" in str(errors[0])
    assert json.loads((out / "report.json").read_text())["options"]["out"] == str(out)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(kept) == 1 and str(kept[0]) in str(errors[0]) and (kept[0] / "report.json").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_appears_during_the_run_is_never_replaced(model_dir, tmp_path, monkeypatch, overwrite):
    out = tmp_path / "out"

    def someone_creates_out_first(*args, **kwargs):
        user_folder(out)
        return publish(*args, **kwargs)

    monkeypatch.setattr(moe_hooked.report, "publish", someone_creates_out_first)
    with pytest.raises(ReportError, match="not a moe-hooked report" if overwrite else "appeared while"):
        run(model_dir, out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_a_report_and_leaves_no_temporary_folder(tmp_path):
    out = finished_report(tmp_path / "out")
    (out / "stale.txt").write_text("old")
    publish(finished_report(tmp_path / ".new"), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_overwrite_even_an_empty_folder_is_not_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    new = finished_report(tmp_path / ".new")
    with pytest.raises(ReportError, match=f"it was not replaced; the new report is kept at {new}"):
        publish(new, tmp_path / "out", overwrite=False)
    assert list((tmp_path / "out").iterdir()) == [] and (new / "index.html").read_text() == "new"


def test_overwrite_with_a_folder_that_another_report_fills_in_between(tmp_path, monkeypatch):
    """The folder moved aside holds a report; if `out` is taken again before the new one moves
    in, the new report and the old one both stay on disk, and the message says where."""
    out = finished_report(tmp_path / "out")
    (out / "index.html").write_text("old")
    new = finished_report(tmp_path / ".new")
    rename = moe_hooked.report_folder.os.rename

    def rename_then_someone_takes_out(source, target):
        rename(source, target)
        if "old-" in str(target):
            user_folder(out, "theirs")

    monkeypatch.setattr(moe_hooked.report_folder.os, "rename", rename_then_someone_takes_out)
    with pytest.raises(ReportError, match="the earlier report is kept at .*old-"):
        publish(new, out, overwrite=True)
    old = next(tmp_path.glob(".out.old-*"))
    assert (old / "index.html").read_text() == "old" and (new / "index.html").read_text() == "new"
    assert (out / "notes.txt").read_text() == "theirs"


@pytest.mark.parametrize("max_tokens", ["1"])
def test_a_token_budget_with_nothing_to_predict_is_refused_before_loading(capsys, tmp_path, monkeypatch, max_tokens):
    monkeypatch.setattr(HookedMoETransformer, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    status = main(["report", "--max-tokens", max_tokens, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "max_tokens=1 leaves no token to predict" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
