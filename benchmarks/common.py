"""Shared helpers of the benchmark scripts: the benchmark model, timing, machine facts, reporting.

Not part of the test suite. Each script prints a markdown table and appends a section
(machine, date, versions, table) to BENCHMARKS.md at the repository root.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
PACKAGES = ("torch", "transformers", "transformer_lens", "nnsight", "moe_hooked")

MID_SIZE = dict(
    vocab_size=8000,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1024,
    num_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
"""The mid-size random OLMoE of the forward and cache benchmarks (batch 4 x 256 tokens)."""
QUICK_SIZE = MID_SIZE | dict(num_hidden_layers=2)
"""`--quick`: the same widths with two layers."""


def save_random_olmoe(folder: Path, quick: bool = False, seed: int = 0) -> Path:
    """A random HF `OlmoeForCausalLM` of the benchmark size, saved in the hub layout to `folder`."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(OlmoeConfig(**(QUICK_SIZE if quick else MID_SIZE)))
    model.save_pretrained(folder)
    return folder


class Timing(NamedTuple):
    """Medians over the timed runs of one thunk: wall seconds, process CPU seconds (user + sys)
    and minor page faults (fresh memory the kernel had to map: the main source of run-to-run
    variance of cache-heavy runs)."""

    wall: float
    cpu: float
    faults: float


def interleaved_timings(thunks: Sequence[Callable[[], object]], reps: int, warmup: int = 2) -> list[Timing | str]:
    """Time every thunk `reps` times after `warmup` untimed calls, round-robin.

    Interleaving spreads the load of a shared machine evenly over the thunks; the CPU
    time of the process is reported too, as it does not count time spent descheduled.
    A thunk that raises is reported by its error (and not called again).
    """
    samples: list[list[Timing]] = [[] for _ in thunks]
    errors: dict[int, str] = {}
    for round_ in range(warmup + reps):
        for i, thunk in enumerate(thunks):
            if i in errors:
                continue
            start = Timing(time.perf_counter(), time.process_time(), _minor_faults())
            try:
                thunk()
            except Exception as err:  # report a tool that fails at run time instead of aborting the benchmark
                errors[i] = f"failed: {type(err).__name__}: {err}"
                continue
            end = Timing(time.perf_counter(), time.process_time(), _minor_faults())
            if round_ >= warmup:
                samples[i].append(Timing(*(b - a for a, b in zip(start, end))))
    return [errors.get(i) or Timing(*(statistics.median(column) for column in zip(*runs))) for i, runs in enumerate(samples)]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM of /proc/self/status (not getrusage's
    ru_maxrss, which Linux keeps across exec, so a child of a big process reports at least
    its parent's size)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def run_child(args: Sequence[str]) -> dict:
    """Run `python <args>` in a fresh process; its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def _ram_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_line() -> str:
    """CPU model and cores, RAM, GPU, torch threads, date and package versions, as one markdown paragraph."""
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (GPU rows: not measured)"
    return (
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
        f"{gib(_ram_bytes())} RAM, GPU: {gpu}. "
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}. Versions: {versions}."
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, body: str, notes: str = "") -> None:
    """Print a section and append it to BENCHMARKS.md."""
    section = f"\n### {title}\n\n{machine_line()}\n\n{body}\n" + (f"\n{notes}\n" if notes else "")
    print(section)
    with open(BENCHMARKS_MD, "a") as f:
        f.write(section)
