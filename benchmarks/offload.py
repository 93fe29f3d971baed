"""Expert offloading (`from_pretrained(expert_memory=...)`) on checkpoints of real size.

- `--model olmoe`: the random OLMoE-1B-7B-shaped bfloat16 checkpoint of `real_size_loading.py`
  (13.8 GB), all in memory and under 4 GiB, 2 GiB and 1 GiB expert budgets: peak RSS and
  forward tokens/s at 1 x 512 and 4 x 512 tokens, bytes read, prefetch hit rate.
- `--model deepseek`: a random DeepSeekMoE-16B-shaped bfloat16 checkpoint (32.8 GB, more than
  this machine's RAM) under a 4 GiB budget: one 512-token forward with `run_with_cache` of every
  MoE hook; peak RSS, tokens/s, bytes read per token.

Each configuration runs in its own process (peak RSS = VmHWM). The checkpoint is written
first and deleted afterwards; the page cache holds whatever of it the kernel kept (reported).

    nice -n 10 python benchmarks/offload.py --model olmoe [--budgets none,4GiB,2GiB,1GiB] [--sizes 1x512,4x512]
    nice -n 10 python benchmarks/offload.py --model deepseek
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import gib, markdown_table, peak_rss_bytes, report, run_child
from real_size_loading import OLMOE_1B_7B, write_checkpoint

DEEPSEEK_MOE_16B = dict(
    model_type="deepseek", architectures=["DeepseekForCausalLM"], vocab_size=102400, hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax", hidden_act="silu", max_position_embeddings=4096,
    rms_norm_eps=1e-6, rope_theta=10000, rope_scaling=None, attention_bias=False, tie_word_embeddings=False,
    bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16",
)
"""config.json of deepseek-ai/deepseek-moe-16b-base (the fields moe_hooked reads)."""


def deepseek_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DeepSeekMoE v1 checkpoint in the hub's per-expert naming, in file order."""
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {f"{p}self_attn.{proj}_proj.weight": (d, d) for proj in "qkvo"}
        if layer < cfg["first_k_dense_replace"]:
            shapes |= _mlp_shapes(p + "mlp.", d, cfg["intermediate_size"])
        else:
            shapes[p + "mlp.gate.weight"] = (cfg["n_routed_experts"], d)
            for e in range(cfg["n_routed_experts"]):
                shapes |= _mlp_shapes(f"{p}mlp.experts.{e}.", d, cfg["moe_intermediate_size"])
            shapes |= _mlp_shapes(p + "mlp.shared_experts.", d, cfg["n_shared_experts"] * cfg["moe_intermediate_size"])
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    return shapes | {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}


def _mlp_shapes(prefix: str, d: int, width: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (width, d), prefix + "up_proj.weight": (width, d), prefix + "down_proj.weight": (d, width)}


# ---------------------------------------------------------------- child process
def child(folder: str, budget: str, sizes: list[tuple[int, int]], cache_moe_hooks: bool) -> dict:
    """Load under `budget` ("none": all in memory) and time one forward per (batch, pos) size."""
    from moe_hooked import HookedMoETransformer

    start = time.perf_counter()
    model = HookedMoETransformer.from_pretrained(folder, expert_memory=None if budget == "none" else budget)
    out = {"load_s": time.perf_counter() - start, "rss_load": peak_rss_bytes(), "runs": []}
    for batch, pos in sizes:
        tokens = torch.randint(3, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(pos + batch))
        if model.expert_store is not None:
            model.expert_store.reset_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            if cache_moe_hooks:
                model.run_with_cache(tokens, names_filter=lambda name: ".mlp.hook_" in name)
            else:
                model(tokens)
        seconds = time.perf_counter() - start
        stats = model.expert_memory_stats() if model.expert_store is not None else {}
        out["runs"].append(dict(size=f"{batch}x{pos}", tokens_per_s=batch * pos / seconds, rss=peak_rss_bytes(), **stats))
    return out


# ---------------------------------------------------------------- main
def page_cache_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def rows_of(budget: str, result: dict) -> list[tuple]:
    if "error" in result:
        return [(budget, "", result["error"], "", "", "", "", "")]
    rows = []
    for run in result["runs"]:
        offloaded = "bytes_read" in run
        rows.append((
            budget, run["size"], f"{run['tokens_per_s']:.1f}", gib(run["rss"]),
            gib(run["bytes_read"]) if offloaded else "-",
            f"{run['bytes_read'] / int(run['size'].split('x')[0]) / int(run['size'].split('x')[1]) / 2**20:.1f}" if offloaded else "-",
            f"{run['prefetch_hits']}/{run['prefetched']} ({run['prefetch_hit_rate']:.0%})" if offloaded else "-",
            gib(run["peak_resident_bytes"]) if offloaded else "-",
        ))
    return rows


HEADERS = ["expert_memory", "tokens", "tokens/s", "peak RSS (process)", "expert bytes read", "MiB read / token",
           "prefetch hits / prefetched", "peak resident experts"]


def run_all(folder: Path, budgets: list[str], sizes: str, cache: bool, threads: int, min_ram_in_memory: int) -> list[tuple]:
    rows = []
    for budget in budgets:
        if budget == "none" and available_bytes() < min_ram_in_memory:
            rows.append((budget, "", f"not run: only {gib(available_bytes())} RAM available", "", "", "", "", ""))
            continue
        cached = page_cache_bytes()
        args = [__file__, "--child", "--folder", str(folder), "--budget", budget, "--sizes", sizes, "--threads", str(threads)]
        result = run_child(args + (["--cache"] if cache else []))
        print(budget, f"(page cache before: {gib(cached)})", json.dumps(result), flush=True)
        rows += rows_of(budget, result)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["olmoe", "deepseek"], default="olmoe")
    parser.add_argument("--budgets", help="comma-separated; 'none' = all in memory (default per model)")
    parser.add_argument("--sizes", help="comma-separated BATCHxPOS (default per model)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        print(json.dumps(child(args.folder, args.budget, sizes, args.cache)))
        return
    deepseek = args.model == "deepseek"
    cfg, shapes = (DEEPSEEK_MOE_16B, deepseek_shapes(DEEPSEEK_MOE_16B)) if deepseek else (OLMOE_1B_7B, None)
    budgets = (args.budgets or ("4GiB" if deepseek else "none,4GiB,2GiB,1GiB")).split(",")
    sizes = args.sizes or ("1x512" if deepseek else "1x512,4x512")
    free = shutil.disk_usage(args.dir).free
    folder = Path(tempfile.mkdtemp(prefix=f"{args.model}_random_", dir=args.dir))
    try:
        start = time.perf_counter()
        total = write_checkpoint(folder, cfg, shapes)
        print(f"wrote {gib(total)} in {time.perf_counter() - start:.0f} s to {folder} (disk free before: {gib(free)})", flush=True)
        rows = run_all(folder, budgets, sizes, deepseek, args.threads, min_ram_in_memory=int(1.3 * total))
    finally:
        shutil.rmtree(folder)
    name = "DeepSeekMoE-16B" if deepseek else "OLMoE-1B-7B"
    notes = (
        f"Random bfloat16 checkpoint with the shapes of {name}, {gib(total)} of tensors, written just before the runs "
        f"and deleted after. One process per budget, {args.threads} torch thread(s), inference mode; one timed "
        f"{'`run_with_cache` of every MoE hook' if deepseek else 'forward'} per size, in the order listed, right after "
        "loading (the first size starts with no expert resident). Page cache: the files were just written, and "
        "the machine's 24 GB of RAM cannot hold them all, so reads come partly from the page cache and partly "
        "from disk. The machine (2 cores) was shared with 8 other agents running tests: tokens/s are noisy."
    )
    body = markdown_table(HEADERS, rows)
    if args.no_report:
        print(body + "\n\n" + notes)
    else:
        report(f"Expert offloading: {name}-shaped checkpoint", body, notes)


if __name__ == "__main__":
    main()
