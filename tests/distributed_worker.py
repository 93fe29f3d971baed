"""One rank of the multi-process tests (tests/test_distributed.py): launched by `torchrun`.

`python tests/distributed_worker.py OUT_DIR` joins the process group (as the CLI does), runs
every corpus analysis on the demo model (see `compute_all`, which the test also runs in one
process), then the failure scenarios, `map_over_ranks`, then the CLI report (which the test
also runs in one process); it writes `OUT_DIR/rank{r}.pkl`.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import time
from pathlib import Path

import torch

from moe_hooked import HookedMoETransformer
from moe_hooked.analysis import expert_importance, perplexity_vs_top_k, pruning_curve, routing_stats, top_tokens_per_expert
from moe_hooked.cli import main as cli_main
from moe_hooked.corpus import all_reduce_sums, corpus_batches, gather_by_batch, map_over_ranks, rank_and_world
from moe_hooked.data import builtin_corpora
from moe_hooked.interventions import expert_output_means
from moe_hooked.launch import process_group_from_env
from moe_hooked.lens import topk_cosine

SETTINGS = {
    # 5 domains x 1 batch of 3 chunks: 5 batches, not divisible by 2; rank 1 gets none of 3 domains
    "odd": dict(max_length=16, batch_size=3, max_tokens=40),
    # 5 domains x 2 batches: divisible
    "even": dict(max_length=16, batch_size=2, max_tokens=48),
    # one domain, one batch: rank 1 gets no batch at all
    "single": dict(max_length=16, batch_size=4, max_tokens=40, domains=["english"]),
}
TIMEOUT_S = 120
"""The process group's timeout: the lost-rank scenario must fail well before it."""
REPORT_ARGS = ["--max-tokens", "96", "--batch-size", "1"]
"""Several batches per domain, dealt across the ranks, and as many figures and sample prompts."""


def report_corpora() -> dict[str, list[str]]:
    """The CLI report's corpora (the test writes them to OUT_DIR/<domain>.txt): one sentence or
    one function per text, so that each domain spans several one-text batches."""
    texts = builtin_corpora(["english", "code"])
    english = [sentence for text in texts["english"] for sentence in re.split(r"(?<=\.) ", text)]
    code = [function for text in texts["code"] for function in re.split(r" (?=def )", text)]
    return {"english": english, "code": code}


def report_argv(out_dir: Path, report: Path) -> list[str]:
    """`moe-hooked report ...` on the files of `report_corpora` in `out_dir`, into `report`."""
    corpora = [arg for domain in report_corpora() for arg in ("--corpus", f"{domain}={out_dir / domain}.txt")]
    return ["report", *REPORT_ARGS, *corpora, "--out", str(report)]


def corpora_for(setting: dict) -> dict[str, list[str]]:
    return builtin_corpora(setting.get("domains"))


def budget_of(setting: dict) -> dict[str, int]:
    return {k: setting[k] for k in ("max_length", "batch_size", "max_tokens")}


def compute_all(model: HookedMoETransformer) -> dict:
    """Every corpus analysis under every setting, as plain numpy / pandas objects."""
    results = {}
    layer = model.cfg.moe_layers[0]
    for name, setting in SETTINGS.items():
        corpora = corpora_for(setting)
        budget = budget_of(setting)
        lengths = {batch.index: batch.attention_mask.sum(-1).cpu()  # real tokens per sequence
                   for _, batch in corpus_batches(model, corpora, progress=False, what="lengths", **budget)}
        results[name, "gather_by_batch"] = torch.cat(gather_by_batch(lengths, "lengths")).numpy()
        counts = routing_stats(model, corpora, progress=False, **budget)
        fields = ("counts", "tokens", "coactivation", "entropy_sum", "sequence_counts", "sequence_tokens", "sequence_domains")
        results[name, "routing_stats"] = {k: getattr(counts, k) for k in fields}
        texts = next(iter(corpora.values()))
        results[name, "top_tokens"] = top_tokens_per_expert(model, texts, layer, top=5, progress=False, **budget)
        results[name, "topk_cosine"] = topk_cosine(model, corpora, progress=False, **budget)
        results[name, "perplexity"] = perplexity_vs_top_k(model, corpora, progress=False, **budget)
        results[name, "importance"] = expert_importance(model, corpora, method="attribution", progress=False, **budget)
        results[name, "pruning"] = pruning_curve(model, corpora, (0, 0.25, 0.5), progress=False, **budget)
        means = expert_output_means(model, texts[:4], batch_size=budget["batch_size"], max_length=16)
        results[name, "expert_means_texts"] = {k: v.numpy() for k, v in means.items()}
    tokens = model.to_tokens(builtin_corpora(["code"])["code"][0])[:, :12].repeat(5, 1)  # 5 rows: 3 batches of 2
    results["tokens", "expert_means_tokens"] = {k: v.numpy() for k, v in expert_output_means(model, tokens, batch_size=2).items()}
    return results


def _failure(run) -> dict:
    """Run `run()`, which must raise on this rank; the error's type, message and the time it took."""
    start = time.perf_counter()
    try:
        run()
    except Exception as err:  # noqa: BLE001 - recorded for the test to check
        return dict(type=type(err).__name__, message=str(err), seconds=time.perf_counter() - start)
    return dict(type=None, message="no error", seconds=time.perf_counter() - start)


def failure_scenarios(model: HookedMoETransformer) -> dict:
    """Ranks with different corpora, a different model, and a rank that raises mid-run."""
    rank = rank_and_world()[0]
    budget, corpora = budget_of(SETTINGS["even"]), corpora_for(SETTINGS["even"])
    out = {}
    other = {**corpora, "code": corpora["code"][1:]} if rank == 1 else corpora
    out["different_corpora"] = _failure(lambda: routing_stats(model, other, progress=False, **budget))

    original = model.W_E[0, 0].item()
    with torch.no_grad():
        model.W_E[0, 0] = original + rank  # rank 1 holds another model
        out["different_model"] = _failure(lambda: topk_cosine(model, corpora, progress=False, **budget))
        model.W_E[0, 0] = original

    out["different_shapes"] = _failure(lambda: all_reduce_sums([torch.zeros(rank + 1)], "a sum"))

    calls = []

    def boom(x, hook):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError("boom on the second batch")

    model.add_hook("blocks.1.mlp.hook_router_logits", boom, is_permanent=True)
    out["raises_mid_run"] = _failure(lambda: perplexity_vs_top_k(model, corpora, progress=False, **budget))
    model.reset_hooks(including_permanent=True)
    # the group is still usable afterwards
    out["after_failures"] = routing_stats(model, corpora, progress=False, **budget).counts
    return out


def run_report(out_dir: Path) -> int:
    """The CLI report on the corpus files in `out_dir` (written by the test), into `out_dir/report`."""
    return cli_main(report_argv(out_dir, out_dir / "report"))


def lose_rank_1(model: HookedMoETransformer, record: dict, path: Path) -> None:
    """Rank 1 vanishes without a word (as if killed); rank 0 must fail, not hang."""
    if rank_and_world()[0] == 1:
        path.write_bytes(pickle.dumps(record))
        os._exit(0)  # exit status 0: torchrun leaves rank 0 running, as after a lost node
    setting = SETTINGS["even"]
    record["failures"]["lost_rank"] = _failure(
        lambda: routing_stats(model, corpora_for(setting), progress=False, **budget_of(setting))
    )


def main(out_dir: Path) -> None:
    with process_group_from_env("cpu", timeout_s=TIMEOUT_S) as launch:
        path = out_dir / f"rank{launch.rank}.pkl"
        model = HookedMoETransformer.from_pretrained("moe-hooked/demo")
        record = dict(launch=launch, results=compute_all(model), failures=failure_scenarios(model))
        record["mapped"] = map_over_ranks(lambda item: (item, launch.rank), list("abcde"), "map_over_ranks")
        record["report_status"] = run_report(out_dir)
        record["second_report_status"] = run_report(out_dir)  # refused on rank 0: the folder exists
        lose_rank_1(model, record, path)
    path.write_bytes(pickle.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
