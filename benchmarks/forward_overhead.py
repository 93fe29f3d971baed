"""Forward-pass overhead against Hugging Face, the TransformerLens 4 bridge and nnsight.

One random mid-size OLMoE (hidden 512, 8 layers, 32 experts of width 1024, top-4,
vocab 8000), saved once in the hub layout and loaded by every tool, so all run the
same weights; batch 4 x 256 tokens, float32, `torch.inference_mode`, median of
`--reps` runs after warmup, all in this one process. Ratios are to HF's default forward.

    python benchmarks/forward_overhead.py [--reps 10] [--threads 1] [--quick] [--no-report] [--label TEXT]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import Timing, interleaved_timings, markdown_table, report, save_random_olmoe

from moe_hooked import HookedMoETransformer

Row = tuple[str, str, Callable[[], object] | str]
"""(tool, what runs, a thunk to time or the reason it could not run)."""


def hf_rows(hf, tokens) -> list[Row]:
    """HF's defaults, then eager experts, then eager experts and eager attention (restored after)."""
    attn, experts = hf.config._attn_implementation, hf.config._experts_implementation

    def run_with(experts_impl: str, attn_impl: str) -> Callable[[], object]:
        def run():
            hf.set_experts_implementation(experts_impl)
            hf.set_attn_implementation(attn_impl)
            try:
                return hf(tokens)
            finally:
                hf.set_experts_implementation(experts)
                hf.set_attn_implementation(attn)

        return run

    return [
        ("HF OlmoeForCausalLM", f"forward (defaults: experts {experts}, attention {attn})", lambda: hf(tokens)),
        ("HF OlmoeForCausalLM", f"forward (experts eager, attention {attn})", run_with("eager", attn)),
        ("HF OlmoeForCausalLM", "forward (experts eager, attention eager)", run_with("eager", "eager")),
    ]


def is_router_logits(name: str) -> bool:
    return name.endswith("mlp.hook_router_logits")


def ours_rows(folder: Path, tokens) -> list[Row]:
    model = HookedMoETransformer.from_pretrained(folder)
    return [
        ("moe_hooked", "forward, no hooks", lambda: model(tokens)),
        ("moe_hooked", "run_with_cache, every hook", lambda: model.run_with_cache(tokens)),
        ("moe_hooked", "run_with_cache, router logits only", lambda: model.run_with_cache(tokens, names_filter=is_router_logits)),
    ]


def nnsight_rows(hf, tokens) -> list[Row]:
    """nnsight wrapping its own copy of the HF model."""
    what = "trace saving every router's logits"
    try:
        from nnsight import NNsight
    except ImportError as err:
        return [("nnsight", what, f"not run: {err} (pip install -e '.[bench]')")]
    wrapped = NNsight(hf)

    def trace():
        saved = []
        with wrapped.trace(tokens):
            for layer in wrapped.model.layers:
                saved.append(layer.mlp.gate.output[0].save())
        return saved

    return [("nnsight", what, trace)]


def bridge_rows(folder: Path, hf, tokens) -> list[Row]:
    """TransformerLens 4's bridge on its own copy of the HF model (it switches its attention to eager)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf)
    except Exception as err:  # an unsupported architecture or an API change: say why in the table
        return [("TransformerLens 4.3 bridge", "boot", f"not run: {type(err).__name__}: {err}")]
    attn = hf.config._attn_implementation
    return [
        ("TransformerLens 4.3 bridge", f"forward (attention {attn})", lambda: bridge(tokens)),
        ("TransformerLens 4.3 bridge", "run_with_cache, every hook", lambda: bridge.run_with_cache(tokens)),
        (
            "TransformerLens 4.3 bridge",
            "run_with_cache, router logits only",
            lambda: bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.gate.hook_out")),
        ),
    ]


def measure(rows: list[Row], reps: int) -> list[tuple[str, str, Timing | str]]:
    thunks = [thunk for _, _, thunk in rows if callable(thunk)]
    with torch.inference_mode():
        timings = iter(interleaved_timings(thunks, reps))
    return [(tool, what, next(timings) if callable(thunk) else thunk) for tool, what, thunk in rows]


def table(measured: list[tuple[str, str, Timing | str]]) -> str:
    base = measured[0][2]
    rows = []
    for tool, what, t in measured:
        if isinstance(t, str):
            rows.append((tool, what, t, "", "", "", ""))
            continue
        wall_ratio, cpu_ratio = (f"{t.wall / base.wall:.2f}x", f"{t.cpu / base.cpu:.2f}x") if isinstance(base, Timing) else ("", "")
        rows.append((tool, what, f"{t.wall * 1000:.0f}", wall_ratio, f"{t.cpu * 1000:.0f}", cpu_ratio, f"{t.faults:.0f}"))
    headers = ["tool", "what", "median wall ms", "wall vs HF default", "median CPU ms", "CPU vs HF default", "page faults"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steady on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 64, 3 reps")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--label", default="", help="a note for the section title (e.g. 'before')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, pos, reps = (2, 64, 3) if args.quick else (4, 256, args.reps)

    from transformers import OlmoeForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_olmoe(Path(tmp), quick=args.quick)
        tokens = torch.randint(3, 8000, (batch, pos), generator=torch.Generator().manual_seed(0))

        def hf_model():
            return OlmoeForCausalLM.from_pretrained(folder).eval()

        rows = hf_rows(hf_model(), tokens) + ours_rows(folder, tokens)
        rows += bridge_rows(folder, hf_model(), tokens) + nnsight_rows(hf_model(), tokens)
        measured = measure(rows, reps)
    title = f"Forward overhead{' (--quick)' if args.quick else ''}{f' — {args.label}' if args.label else ''}"
    notes = (
        f"Random OLMoE, {'2' if args.quick else '8'} layers x 32 experts (width 1024, top-4), hidden 512, "
        f"vocab 8000; batch {batch} x {pos} tokens, float32, inference mode, {args.threads} torch thread(s); "
        f"medians of {reps} runs after 2 warmups, the rows interleaved run by run. CPU ms is the process's "
        "user + sys time, which does not count time the process waited for a core; page faults: median minor faults "
        "per run (each maps a fresh 4 KiB page: 1-8 us in this VM). The TransformerLens bridge "
        "and nnsight each wrap their own copy of the same HF model; the bridge forces eager attention on its copy."
    )
    if os.environ.get("GLIBC_TUNABLES"):
        notes += f" Run with GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}."
    if args.no_report:
        print(table(measured))
    else:
        report(title, table(measured), notes)


if __name__ == "__main__":
    main()
