"""Throughput and peak memory of `moe_hooked.analysis.routing_stats` on the demo model.

Runs `routing_stats` of `HookedMoETransformer.from_pretrained("moe-hooked/demo")` over the
paper's domain texts (`../shared/data/domains/*.txt`, one sample a line), then over ten
copies of that text, each size in its own process so that ru_maxrss is that run's peak.
Memory should not grow with the corpus: routing_stats streams batches into fixed-size sums.

    python benchmarks/analysis_throughput.py [--quick] [--threads 1] [--no-report]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import REPO, gib, markdown_table, peak_rss_bytes, report, run_child

DOMAINS = REPO.parent / "shared" / "data" / "domains"
SIZES = {"1x": 1, "10x": 10}


def corpora(copies: int) -> dict[str, list[str]]:
    """{domain: texts} of the domain files, each file's texts repeated `copies` times."""
    from moe_hooked.data import load_texts

    files = sorted(DOMAINS.glob("*.txt"))
    if not files:
        raise SystemExit(f"no domain texts in {DOMAINS}: this benchmark reads the paper's domain files there")
    return {path.stem: load_texts(path) * copies for path in files}


def child(copies: int) -> dict:
    """Load the demo model, run routing_stats once over the corpus; JSON-ready numbers."""
    from moe_hooked import HookedMoETransformer
    from moe_hooked.analysis import routing_stats

    texts = corpora(copies)
    model = HookedMoETransformer.from_pretrained("moe-hooked/demo")
    rss_model = peak_rss_bytes()
    start = time.perf_counter()
    counts = routing_stats(model, texts, progress=False)
    seconds = time.perf_counter() - start
    tokens = int(counts.tokens[:, 0].sum())
    return {"tokens": tokens, "seconds": seconds, "rss_model": rss_model, "rss_peak": peak_rss_bytes()}


def table(results: dict[str, dict]) -> str:
    rows = []
    for size, r in results.items():
        if "error" in r:
            rows.append((size, r["error"], "", "", "", ""))
            continue
        rss = (gib(r["rss_model"]), gib(r["rss_peak"]))
        rows.append((size, r["tokens"], f"{r['seconds']:.1f}", f"{r['tokens'] / r['seconds']:.0f}", *rss))
    headers = ["corpus", "tokens", "seconds", "tokens/s", "peak RSS after loading", "peak RSS after routing_stats"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 1x corpus only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steady on a shared machine)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child)))
        return
    sizes = {"1x": 1} if args.quick else SIZES
    results = {}
    for size, copies in sizes.items():
        results[size] = run_child([__file__, "--child", str(copies), "--threads", str(args.threads)])
        print(size, results[size], flush=True)
    notes = (
        f"`routing_stats(model, corpora)` with its defaults (batches of 8 chunks of up to n_ctx tokens, "
        f"co-activation on) on the demo model, over the {len(corpora(1))} domain files of {DOMAINS.name}/; "
        f"10x repeats every text ten times. One process per corpus size, {args.threads} torch thread(s); "
        "tokens counts real (unpadded) tokens."
    )
    if args.no_report:
        print(table(results))
    else:
        report(f"Analysis throughput{' (--quick)' if args.quick else ''}", table(results), notes)


if __name__ == "__main__":
    main()
