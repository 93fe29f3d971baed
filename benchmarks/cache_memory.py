"""Bytes held by an activation cache, against a dense per-expert layout.

The same random mid-size OLMoE and batch as `forward_overhead.py` (4 x 256 tokens,
float32). Counts the bytes of every tensor in a full `run_with_cache`, of the MoE hooks
alone (`blocks.{l}.mlp.hook_*`), and what the per-expert outputs would need in a dense
`[batch pos n_experts d_model]` layout (as `hook_all_expert_out` stores them) instead of
our `[batch pos k d_model]` slots. All sizes are computed from tensor shapes and dtypes.

    python benchmarks/cache_memory.py [--quick] [--no-report]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import gib, markdown_table, report, save_random_olmoe

from moe_hooked import HookedMoETransformer


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model: HookedMoETransformer, tokens: torch.Tensor) -> list[tuple[str, int]]:
    """(what, bytes) rows for one full cache of `tokens`."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    cfg = model.cfg
    moe = {name: t for name, t in cache.items() if ".mlp.hook_" in name}
    expert_out = [t for name, t in moe.items() if name.endswith("hook_expert_out")]
    batch, pos = tokens.shape
    dense = len(cfg.moe_layers) * batch * pos * cfg.n_experts * cfg.d_model * expert_out[0].element_size()
    return [
        (f"full run_with_cache ({len(cache)} hooks)", nbytes(cache.values())),
        (f"MoE hooks only ({len(moe)} hooks)", nbytes(moe.values())),
        ("of which hook_expert_out [batch pos k d_model]", nbytes(expert_out)),
        ("dense [batch pos n_experts d_model], summed over the MoE layers", dense),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 64")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    batch, pos = (2, 64) if args.quick else (4, 256)
    with tempfile.TemporaryDirectory() as tmp:
        model = HookedMoETransformer.from_pretrained(save_random_olmoe(Path(tmp), quick=args.quick))
    tokens = torch.randint(3, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0))
    rows = measure(model, tokens)
    dense = rows[-1][1]
    body = markdown_table(
        ["cache", "bytes", "size", "vs dense per-expert layout"],
        [(what, n, gib(n), f"{n / dense:.3f}x") for what, n in rows],
    )
    cfg = model.cfg
    notes = (
        f"{cfg.n_layers} MoE layers, {cfg.n_experts} experts, top-{cfg.top_k}, d_model {cfg.d_model}; "
        f"batch {batch} x {pos} tokens, float32. The dense layout is what storing every expert's output "
        "per token would take (`model.all_experts()` + `hook_all_expert_out`); the default cache keeps only "
        "the k selected slots."
    )
    if args.no_report:
        print(body)
    else:
        report(f"Cache memory{' (--quick)' if args.quick else ''}", body, notes)


if __name__ == "__main__":
    main()
