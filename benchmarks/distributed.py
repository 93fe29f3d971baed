"""Speed-up of the corpus analyses with torch.distributed: 1 process against 2 (gloo, 1 thread each).

Two measures, each run alternately with 1 and 2 processes (`--reps` rounds, medians reported):

- `routing_stats` on the demo model over the built-in corpora (repeated to `--tokens` tokens per
  domain), timed inside the processes after a warm-up (model loading and process start excluded):
  rank 0 prints the tokens counted and the seconds between two synchronisations of all ranks;
- the whole default report, `python -m moe_hooked report` against
  `torchrun --nproc-per-node 2 -m moe_hooked report`, timed from outside (process start, model
  loading, every analysis, figures and files), plus the corpus-analysis stages from report.json;
  and `torchrun --nproc-per-node 1` against 2, which leaves out the launcher's own start.

The machine's 1-minute load average is recorded before each run: other work on the machine
takes cores from the runs, and then 2 processes cannot reach 2x.

    python benchmarks/distributed.py [--reps 3] [--tokens 20000] [--no-report]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, markdown_table, report

REPORT_STAGES = (
    "routing statistics", "top-1 vs top-k cosine", "perplexity vs top-k", "expert importance", "pruning curve"
)


def worker(tokens_per_domain: int) -> None:
    """Inside torchrun: time routing_stats; rank 0 prints `{"tokens", "seconds", "cpu"}` as JSON
    (`cpu`: each rank's process CPU seconds over the same span)."""
    import torch

    from moe_hooked import HookedMoETransformer
    from moe_hooked.analysis import routing_stats
    from moe_hooked.corpus import all_reduce_sums, barrier
    from moe_hooked.data import builtin_corpora
    from moe_hooked.launch import process_group_from_env

    corpora = {domain: texts * 50 for domain, texts in builtin_corpora().items()}
    with process_group_from_env("cpu") as launch:
        model = HookedMoETransformer.from_pretrained("moe-hooked/demo")
        routing_stats(model, corpora, max_tokens=512, progress=False)  # warm-up
        barrier("benchmark")
        start, cpu_start = time.perf_counter(), time.process_time()
        counts = routing_stats(model, corpora, max_tokens=tokens_per_domain, progress=False)
        barrier("benchmark")
        seconds = time.perf_counter() - start
        cpu = torch.zeros(launch.world_size)
        cpu[launch.rank] = time.process_time() - cpu_start
        (cpu,) = all_reduce_sums([cpu], "benchmark")
        if launch.rank == 0:
            print(json.dumps({"tokens": int(counts.tokens[:, 0].sum()), "seconds": seconds, "cpu": cpu.tolist()}))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _launch(n_processes: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_processes), *args]


def _run(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=_env(), cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def routing_run(n_processes: int, tokens_per_domain: int, cwd: Path) -> dict:
    _, stdout = _run(_launch(n_processes, [__file__, "--worker", str(tokens_per_domain)]), cwd)
    return json.loads(stdout.strip().splitlines()[-1])


def report_run(n_processes: int, cwd: Path, torchrun: bool = True) -> dict:
    """The default report in `n_processes` under torchrun, or (`torchrun=False`, 1 process) with
    `python -m moe_hooked`, as a user without torchrun runs it."""
    out = cwd / f"report_{n_processes}"
    args = ["report", "--out", str(out), "--overwrite"]
    if torchrun:
        seconds, _ = _run(_launch(n_processes, ["-m", "moe_hooked", *args]), cwd)
    else:
        seconds, _ = _run([sys.executable, "-m", "moe_hooked", *args], cwd)
    meta = json.loads((out / "report.json").read_text())
    counts = json.loads((out / "counts.json").read_text())
    assert meta["options"]["world_size"] == n_processes
    return {"seconds": seconds, "analyses": sum(meta["timings_s"][s] for s in REPORT_STAGES),
            "tokens": sum(row[0] for row in counts["tokens"])}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _busiest_cpu(group: list[dict]) -> float:
    """The largest over ranks of each rank's median CPU seconds."""
    return max(statistics.median(per_rank) for per_rank in zip(*(run["cpu"] for run in group)))


def _row(label: str, tokens: int, one: float, two: float) -> tuple:
    """A table row: seconds and tokens/s with 1 and 2 processes, and the speed-up."""
    return (label, tokens, f"{one:.1f}", f"{tokens / one:.0f}", f"{two:.1f}", f"{tokens / two:.0f}", f"{one / two:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="rounds of (1 process, 2 processes) per measure")
    parser.add_argument("--tokens", type=int, default=20000, help="routing_stats tokens per domain (5 domains)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, n in (("routing_stats", 1), ("routing_stats", 2), ("report", 1), ("torchrun report", 1),
                            ("report", 2)):
                load = os.getloadavg()[0]
                if name == "routing_stats":
                    run = routing_run(n, args.tokens, Path(tmp))
                else:
                    run = report_run(n, Path(tmp), torchrun=(name, n) != ("report", 1))
                runs.setdefault((name, n), []).append({**run, "load": load})
                print(rep, name, n, runs[name, n][-1], flush=True)
    rows = []
    for name, key, label in (("routing_stats", "seconds", "routing_stats (in-process timing)"),
                             ("report", "analyses", f"report: the {len(REPORT_STAGES)} corpus-analysis stages"),
                             ("report", "seconds", "report: whole command (start, load, analyses, files)")):
        one, two = (_median(runs[name, n], key) for n in (1, 2))
        tokens = runs[name, 1][0]["tokens"]
        rows.append(_row(label, tokens, one, two))
    one, two = _median(runs["torchrun report", 1], "seconds"), _median(runs["report", 2], "seconds")
    rows.append(_row("report: whole command, both under torchrun (1 process also pays the launcher)",
                     runs["report", 1][0]["tokens"], one, two))
    tokens = runs["routing_stats", 1][0]["tokens"]
    one, two = (_busiest_cpu(runs["routing_stats", n]) for n in (1, 2))
    rows.append(_row("routing_stats, CPU seconds of the busiest rank (the wall time on an idle machine)", tokens,
                     one, two))
    table = markdown_table(["measure", "corpus tokens", "1 process s", "tokens/s", "2 processes s", "tokens/s",
                            "speed-up"], rows)
    loads = [run["load"] for group in runs.values() for run in group]
    notes = (
        f"Medians of {args.reps} interleaved rounds; gloo, OMP_NUM_THREADS=1 (1 torch thread per process). "
        f"routing_stats: the built-in corpora repeated, {args.tokens} tokens per domain, timed between two "
        "synchronisations of all ranks after a warm-up. Report: the default `moe-hooked report` (demo model, "
        "built-in corpora, 2048 tokens per domain per analysis); 1 process is `python -m moe_hooked report` "
        "(in the 'both under torchrun' row `torchrun --nproc-per-node 1 -m moe_hooked report`), 2 are "
        "`torchrun --nproc-per-node 2 -m moe_hooked report`; 'tokens' counts the corpus once (each analysis reads "
        f"it again). 1-minute load average before the runs: median {statistics.median(loads):.1f} "
        f"(min {min(loads):.1f}, max {max(loads):.1f}) on {os.cpu_count()} cores."
    )
    if args.no_report:
        print(table + "\n\n" + notes)
    else:
        report("Distributed corpus analyses: 1 vs 2 processes", table, notes)


if __name__ == "__main__":
    main()
