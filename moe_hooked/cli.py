"""The `moe-hooked` console script (also `python -m moe_hooked`). Subcommands:

- `report`: run every analysis on a model and corpora, write an HTML report folder
  (see :mod:`moe_hooked.report`). Under `torchrun` every process joins one process group
  (:mod:`moe_hooked.launch`), the analyses share out the batches, and rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from collections.abc import Sequence

from moe_hooked.analysis.paper import PAPER_MODELS
from moe_hooked.corpus import RankFailedError, barrier, shared_failures
from moe_hooked.launch import DEFAULT_TIMEOUT_S, LaunchError, process_group_from_env
from moe_hooked.report import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_OUT,
    ReportError,
    prepare_report,
    write_report,
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _corpus(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=PATH (e.g. english=data/english.txt)")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-hooked", description="Hooked Mixture-of-Experts models: analyses and reports."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report",
        help="run every analysis on a model and corpora and write an HTML report",
        description="Run routing statistics, specialization, coverage, entropy, top-1 vs top-k cosine, "
        "perplexity vs top-k, pruning and the expert lens on a model over corpora; write index.html "
        "with the figures and tables, plus CSV/JSON of every number.",
    )
    report.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or checkpoint folder (default: {DEFAULT_MODEL})")
    report.add_argument(
        "--corpus", action="append", type=_corpus, metavar="NAME=PATH",
        help="a domain and its .txt (one sample per line) or .jsonl file; repeat for several "
        "(default: the built-in sample corpora)",
    )
    report.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS,
                        help=f"tokens read per domain by each analysis (default: {DEFAULT_MAX_TOKENS})")
    report.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                        help=f"sequences per forward pass (default: {DEFAULT_BATCH_SIZE})")
    report.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    report.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu; under torchrun: cuda:LOCAL_RANK "
                        "if CUDA is available, else cpu)")
    report.add_argument("--timeout", type=_positive_int, default=int(DEFAULT_TIMEOUT_S), metavar="SECONDS",
                        help="under torchrun: how long a process waits for the others before failing "
                        f"(default: {int(DEFAULT_TIMEOUT_S)})")
    report.add_argument("--expert-memory", metavar="SIZE",
                        help="stream routed experts from disk, at most SIZE of them in memory, e.g. 2GiB "
                        "(default: everything in memory)")
    report.add_argument("--paper-counts", metavar="PATH",
                        help="the MoE Lens paper's routing_counts.json: add a section with our coverage and "
                        "specialization beside the paper's, on the domains both have (needs --paper-model)")
    report.add_argument("--paper-model", choices=sorted(PAPER_MODELS),
                        help="which of the paper's models to compare with (with --paper-counts)")
    report.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    report.add_argument("--overwrite", action="store_true", help="replace the output folder if it holds a report")
    report.set_defaults(run=_report)
    return parser


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    corpora = None
    if args.corpus:
        names = [name for name, _ in args.corpus]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            parser.error(f"--corpus names must be distinct; repeated: {', '.join(duplicates)}")
        corpora = dict(args.corpus)
    stage = "prepare"
    try:
        with process_group_from_env(args.device, args.timeout) as launch, shared_failures("report"):
            inputs = prepare_report(args.model, corpora, args.out, args.max_tokens, args.batch_size,
                                    args.dtype, launch.device, args.overwrite, command=command,
                                    expert_memory=args.expert_memory, paper_counts=args.paper_counts,
                                    paper_model=args.paper_model)
            stage = "write"
            out = write_report(inputs)
            barrier("report")  # every rank fails if rank 0 failed to write
    except (ReportError, LaunchError, RankFailedError) as err:
        print(f"moe-hooked report: error: {err}", file=sys.stderr)
        # 2: refused before any work; 1: failed while running (another rank, or the folder changed meanwhile)
        return 2 if stage == "prepare" and not isinstance(err, RankFailedError) else 1
    if launch.rank == 0:
        print(f"report written to {out / 'index.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moe-hooked` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, parser, shlex.join(["moe-hooked", *argv]))


def script(argv: Sequence[str] | None = None) -> int:
    """The console script and `python -m moe_hooked`: :func:`main`, then exit without the
    interpreter's final garbage-collection passes over every object torch, TransformerLens and
    matplotlib created (`gc.freeze`; 1-2 s per process, which every `torchrun` rank would pay).
    Objects are still freed by reference counting; only the cycle search is skipped."""
    status = main(argv)
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(script())
