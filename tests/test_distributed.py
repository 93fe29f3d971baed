"""Corpus analyses across processes: two real gloo ranks launched by `torchrun` against one process.

One `torchrun --nproc-per-node 2` run of tests/distributed_worker.py computes every analysis
under three batch layouts (batches not divisible by the world size, divisible, one batch so
that rank 1 gets none), runs the failure scenarios and the CLI report; each rank pickles what
it saw, and the tests compare it with the same code run here without a process group; the
report's files are compared with those of the same report made by one process.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moe_hooked.corpus as corpus
from moe_hooked import HookedMoETransformer
from moe_hooked.analysis import routing_stats
from moe_hooked.corpus import all_reduce_sums, corpus_batches, deal, map_over_ranks, shared_failures

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 900  # far above a normal run: reaching it means a hang
ONE_THREAD = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model():
    return HookedMoETransformer.from_pretrained("moe-hooked/demo")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """`[record of rank 0, record of rank 1]` and the run's folder."""
    out = tmp_path_factory.mktemp("distributed")
    for domain, texts in worker.report_corpora().items():
        (out / f"{domain}.txt").write_text("\n".join(texts))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               str(REPO / "tests" / "distributed_worker.py"), str(out)]
    done = subprocess.run(command, env=ONE_THREAD, cwd=out, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (out / "stderr.txt").write_text(done.stderr)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)], out


@pytest.fixture(scope="module")
def one_process_report(two_ranks, tmp_path_factory):
    """The two-rank run's CLI report made by `python -m moe_hooked` in one process (one thread,
    as each rank), on the same corpus files; returns its folder."""
    _, out = two_ranks
    report = tmp_path_factory.mktemp("one_process") / "report"
    command = [sys.executable, "-m", "moe_hooked", *worker.report_argv(out, report)]
    done = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-6000:]
    return report


@pytest.fixture(scope="module")
def one_process(model):
    """The analyses in this process, with one thread as each rank (float32 matrix products give
    results that differ in the last bits with the number of threads, whatever the process count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return worker.compute_all(model)
    finally:
        torch.set_num_threads(threads)


def _assert_same(got, expected, where: str) -> None:
    """Integers exactly, floats to 1e-6 relative, through dicts, arrays and tables."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}[{key}]")
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-6, atol=0, obj=where)
        for column in expected.select_dtypes("integer"):
            assert (got[column] == expected[column]).all(), f"{where}: {column}"
    elif expected is None:
        assert got is None, where
    elif np.issubdtype(np.asarray(expected).dtype, np.integer):
        np.testing.assert_array_equal(got, expected, err_msg=where)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0, equal_nan=True, err_msg=where)


# --------------------------------------------------------------------------- without processes
def _batches(model, setting: dict, monkeypatch, rank: int, world: int) -> list[tuple[int, torch.Tensor]]:
    """`(domain index, tokens)` of the batches `corpus_batches` gives `rank` of `world`."""
    monkeypatch.setattr(corpus, "rank_and_world", lambda: (rank, world))
    batches = corpus_batches(model, worker.corpora_for(setting), progress=False, **worker.budget_of(setting))
    return [(d, batch.tokens) for d, batch in batches]


def test_batches_are_dealt_by_size_and_their_union_is_the_whole_corpus(model, monkeypatch):
    monkeypatch.setattr(corpus, "check_same_inputs", lambda *args, **kwargs: None)  # no other rank to ask
    sizes = {}
    for name, setting in worker.SETTINGS.items():
        everything = _batches(model, setting, monkeypatch, 0, 1)
        sizes[name] = len(everything)
        shares = [_batches(model, setting, monkeypatch, rank, 2) for rank in range(2)]
        owner = {}  # position in the single-process stream -> rank; each share keeps the stream's order
        for rank, share in enumerate(shares):
            start = 0
            for d, tokens in share:
                i = next(i for i in range(start, len(everything)) if everything[i][0] == d
                         and torch.equal(everything[i][1], tokens))
                owner[i], start = rank, i + 1
        assert sorted(owner) == list(range(len(everything))), name  # disjoint, and together the whole corpus
        padded = [sum(tokens.numel() for _, tokens in share) for share in shares]
        assert abs(padded[0] - padded[1]) <= max(tokens.numel() for _, tokens in everything), name
    # the layouts the two-rank run covers: odd and even numbers of batches, a rank without any
    assert sizes["odd"] % 2 == 1 and sizes["even"] % 2 == 0 and sizes["single"] == 1


def test_deal_and_reductions_without_a_process_group():
    assert list(deal(range(5))) == [0, 1, 2, 3, 4]
    floats, ints = torch.tensor([1.5, 2.0], dtype=torch.float32), torch.tensor([[3, 4]], dtype=torch.int32)
    summed = all_reduce_sums([floats, ints])
    assert summed[0].dtype == torch.float64 and summed[1].dtype == torch.int64
    assert torch.equal(summed[0], floats.double()) and torch.equal(summed[1], ints.long())
    summed[0] += 1  # copies: the accumulators are not touched
    assert torch.equal(floats, torch.tensor([1.5, 2.0]))
    with pytest.raises(KeyError):
        with shared_failures("nothing to share"):
            raise KeyError("stays as it is")


def test_map_over_ranks_without_a_process_group_is_a_plain_map():
    assert map_over_ranks(str.upper, ["a", "b", "c"]) == ["A", "B", "C"]
    assert map_over_ranks(str.upper, []) == []


def test_map_over_ranks_deals_the_items_and_gives_every_rank_every_result(two_ranks):
    for record in two_ranks[0]:  # item i drawn on rank i % 2, every result on both ranks, in item order
        assert record["mapped"] == [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 0)]


def test_deal_with_ranks(monkeypatch):
    monkeypatch.setattr(corpus, "rank_and_world", lambda: (1, 3))
    assert list(deal("abcdefg")) == ["b", "e"]  # equal costs: item i to rank i % 3
    assert list(deal(range(40)))[-3:] == [31, 34, 37]  # across windows of DEAL_ROUNDS * 3 items too
    monkeypatch.setattr(corpus, "rank_and_world", lambda: (2, 3))
    assert list(deal("ab")) == []


@pytest.mark.parametrize(("costs", "shares"), [
    ([5, 1, 1, 1, 1, 1], ([0], [1, 2, 3, 4, 5])),  # the big item outweighs the five small ones
    ([1, 1, 4], ([2], [0, 1])),  # costliest first within the window, each share in item order
    ([3, 3, 2, 2, 2], ([0, 2, 4], [1, 3])),  # 7 vs 5: apart by less than the costliest item (3)
])
def test_deal_by_cost_balances_the_shares(monkeypatch, costs, shares):
    for rank, expected in enumerate(shares):
        monkeypatch.setattr(corpus, "rank_and_world", lambda rank=rank: (rank, 2))
        assert list(deal(range(len(costs)), cost=costs.__getitem__)) == expected


# --------------------------------------------------------------------------- two gloo ranks
def test_every_analysis_on_two_ranks_equals_one_process(two_ranks, one_process):
    records, _ = two_ranks
    for rank, record in enumerate(records):
        assert (record["launch"].rank, record["launch"].world_size, record["launch"].backend) == (rank, 2, "gloo")
        assert record["results"].keys() == one_process.keys()
        for key, expected in one_process.items():
            _assert_same(record["results"][key], expected, f"rank {rank} {key}")


def test_ranks_given_different_corpora_fail_before_the_work(two_ranks):
    for record in two_ranks[0]:
        failure = record["failures"]["different_corpora"]
        assert failure["type"] == "RankFailedError"
        assert "routing_stats: the ranks were given different corpora" in failure["message"]


def test_ranks_given_different_models_fail_before_the_work(two_ranks):
    for record in two_ranks[0]:
        failure = record["failures"]["different_model"]
        assert failure["type"] == "RankFailedError"
        assert "topk_cosine: the ranks were given different model weights" in failure["message"]


def test_sums_of_different_shapes_are_refused_on_every_rank(two_ranks):
    for record in two_ranks[0]:
        failure = record["failures"]["different_shapes"]
        assert failure["type"] == "RankFailedError"
        assert failure["message"].startswith("a sum: the ranks hold sums of different shapes")


def test_a_rank_that_raises_mid_run_stops_every_rank_with_its_error(two_ranks, one_process, model):
    failing, other = two_ranks[0][1]["failures"], two_ranks[0][0]["failures"]
    assert failing["raises_mid_run"]["type"] == "RuntimeError"
    assert failing["raises_mid_run"]["message"] == "boom on the second batch"
    # rank 0 hears of it at its next synchronisation (not by a timeout: the message is rank 1's)
    assert other["raises_mid_run"]["type"] == "RankFailedError"
    assert ("perplexity_vs_top_k stopped on rank 0 because another rank failed: "
            "rank 1: perplexity_vs_top_k: RuntimeError: boom on the second batch") == other["raises_mid_run"]["message"]
    # and the process group is usable afterwards
    setting = worker.SETTINGS["even"]
    expected = routing_stats(model, worker.corpora_for(setting), progress=False, **worker.budget_of(setting)).counts
    for record in two_ranks[0]:
        np.testing.assert_array_equal(record["failures"]["after_failures"], expected)


def test_a_rank_lost_without_a_word_makes_the_others_fail_not_hang(two_ranks):
    lost = two_ranks[0][0]["failures"]["lost_rank"]
    assert lost["type"] == "RankFailedError"
    assert lost["message"].startswith("routing_stats: rank 0 lost contact with the other ranks")
    assert lost["seconds"] < worker.TIMEOUT_S  # gloo saw the closed connection: no wait for the timeout


def test_cli_report_on_two_ranks_is_written_once_by_rank_0(two_ranks, model):
    records, out = two_ranks
    assert [record["report_status"] for record in records] == [0, 0]
    assert sorted(p.name for p in out.iterdir()) == ["code.txt", "english.txt", "rank0.pkl", "rank1.pkl", "report",
                                                     "stderr.txt"]
    meta = json.loads((out / "report" / "report.json").read_text())
    assert (meta["options"]["world_size"], meta["options"]["backend"]) == (2, "gloo")
    assert "<td>2 (gloo)</td>" in (out / "report" / "index.html").read_text()
    counts = json.loads((out / "report" / "counts.json").read_text())
    expected = routing_stats(model, worker.report_corpora(), max_tokens=96, batch_size=1, progress=False)
    assert counts["counts"] == expected.counts.tolist()
    np.testing.assert_allclose(counts["entropy_sum"], expected.entropy_sum, rtol=1e-6)


RUN_DETAILS = [  # (pattern, stand-in): what differs between two runs of the same report
    (r"circuits-vis-[0-9a-f]{8}-[0-9a-f]{4}", "circuits-vis-ID"),  # circuitsvis draws a random element id
    (r"<td>\d{4}-\d\d-\d\dT[\d:+]+</td>", "<td>DATE</td>"),  # index.html: when it was generated,
    (r"<td>\d+ \(\w+\)</td>", "<td>PROCESSES</td>"),  # how many processes, with which backend,
    (r"<td>[\d.]+ s</td>", "<td>SECONDS</td>"),  # and how long each stage took
]


def _report_files(folder: Path) -> dict[str, bytes]:
    """Every file of a report, with what differs between runs replaced by stand-ins (and its
    own folder's name by "OUT"); report.json without its timings and process count."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".png":
            files[name] = path.read_bytes()
            continue
        text = path.read_text(encoding="utf-8").replace(str(folder), "OUT")
        if name == "report.json":
            meta = json.loads(text)
            for key in ("timings_s", "options.world_size", "options.backend"):
                *parents, last = key.split(".")
                (meta[parents[0]] if parents else meta).pop(last)
            text = json.dumps(meta)
        for pattern, stand_in in RUN_DETAILS:
            text = re.sub(pattern, stand_in, text)
        files[name] = text.encode()
    return files


def test_cli_report_on_two_ranks_writes_the_same_files_as_one_process(two_ranks, one_process_report):
    _, out = two_ranks
    two, one = _report_files(out / "report"), _report_files(one_process_report)
    assert sorted(two) == sorted(one)
    assert sum(name.endswith(".png") for name in one) == 8  # 6 figures and 2 co-activation maps, dealt to the ranks
    assert sum(name.startswith("routing_") and name.endswith(".html") for name in one) == 2  # a prompt per domain
    for name, content in one.items():
        assert two[name] == content, f"{name} differs between 2 processes and 1"


def test_cli_report_refused_on_rank_0_fails_on_every_rank(two_ranks):
    # rank 0 refuses the existing output folder (exit 2); rank 1 hears of it before its work (exit 1)
    assert [record["second_report_status"] for record in two_ranks[0]] == [2, 1]
    stderr = (two_ranks[1] / "stderr.txt").read_text()
    assert "moe-hooked report: error: output folder" in stderr
    assert ("moe-hooked report: error: routing_stats stopped on rank 1 because another rank failed: "
            "rank 0: report: ReportError: output folder") in stderr


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "moe_hooked", "report", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--timeout" in done.stdout and "torchrun" in done.stdout
