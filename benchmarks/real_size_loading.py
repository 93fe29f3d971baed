"""Loading and running a checkpoint of real size: moe_hooked against Hugging Face.

Writes a random bfloat16 checkpoint with the exact shapes of allenai/OLMoE-1B-7B-0924
(vocab 50304, hidden 2048, 16 layers, 16 heads, 64 experts of width 1024, top-8, q/k
norm; ~14 GB) as sharded safetensors in the hub's per-expert layout (~5 GB shards and
`model.safetensors.index.json`), tensor by tensor so that writing needs little memory.
Then, each in its own process: `HookedMoETransformer.from_pretrained` and HF
`OlmoeForCausalLM.from_pretrained(dtype=torch.bfloat16)` load time and peak RSS, and
forward tokens/s on one 512-token sequence. The checkpoint is deleted afterwards.

Needs ~15 GB of disk and at least 20 GiB of available RAM (checked first).

    python benchmarks/real_size_loading.py [--quick] [--dir /tmp] [--threads 1] [--no-report]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch
from common import gib, markdown_table, peak_rss_bytes, report, run_child

OLMOE_1B_7B = dict(
    model_type="olmoe",
    architectures=["OlmoeForCausalLM"],
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-05,
    hidden_act="silu",
    attention_bias=False,
    clip_qkv=None,
    norm_topk_prob=False,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.01,
    output_router_logits=False,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=50279,
    torch_dtype="bfloat16",
)
"""config.json of allenai/OLMoE-1B-7B-0924 (its published values)."""
SHARD_BYTES = 5 * 10**9
MIN_AVAILABLE_RAM = 20 * 2**30
GEN = torch.Generator().manual_seed(0)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an OLMoE checkpoint in the hub's per-expert naming, in file order."""
    d, vocab, width = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d)}
        shapes |= {p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d)}
        shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (kv,)}
        shapes[p + "mlp.gate.weight"] = (cfg["num_experts"], d)
        for e in range(cfg["num_experts"]):
            q = f"{p}mlp.experts.{e}."
            shapes |= {q + "gate_proj.weight": (width, d), q + "up_proj.weight": (width, d), q + "down_proj.weight": (d, width)}
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    return shapes


POOL_VALUES = 2**26
_POOL: list[torch.Tensor] = []


def random_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """Norm gains are ones; matrices are N(0, 0.02^2), as HF initialises OLMoE; bfloat16.

    Matrices up to 2^26 values are slices at random offsets of one pool of such values, so
    that writing tens of GB takes minutes rather than the time of drawing every value."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    n = torch.Size(shape).numel()
    if n > POOL_VALUES:
        return (0.02 * torch.randn(shape, generator=GEN)).to(torch.bfloat16)
    if not _POOL:
        _POOL.append((0.02 * torch.randn(POOL_VALUES, generator=GEN)).to(torch.bfloat16))
    start = int(torch.randint(0, POOL_VALUES - n + 1, (1,), generator=GEN))
    return _POOL[0][start : start + n].view(shape)


def plan_shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Group tensors in order into shards of at most SHARD_BYTES (bfloat16: 2 bytes a value)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n_bytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + n_bytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n_bytes
    return shards


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
    """One safetensors file (8-byte header length, JSON header padded to 8 bytes, data), written a tensor at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        end = offset + 2 * torch.Size(shapes[name]).numel()
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            f.write(random_tensor(shapes[name]).view(torch.int16).numpy())


def write_checkpoint(folder: Path, cfg: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """Write config.json, the shards and their index; return the bytes of tensor data.

    `shapes`: every tensor's shape in file order (default: OLMoE's, `tensor_shapes(cfg)`)."""
    shapes = shapes or tensor_shapes(cfg)
    shards = plan_shards(shapes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    for file, names in zip(files, shards):
        write_shard(folder / file, names, shapes)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


# ---------------------------------------------------------------- child processes
def loader(tool: str):
    """The tool's from_pretrained, imported (outside the timed load)."""
    if tool == "moe_hooked":
        from moe_hooked import HookedMoETransformer

        return HookedMoETransformer.from_pretrained
    from transformers import OlmoeForCausalLM

    return lambda folder: OlmoeForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def child(tool: str, folder: str, n_tokens: int, reps: int) -> dict:
    """Load, then time the forward of one `n_tokens` sequence; JSON-ready numbers."""
    from_pretrained = loader(tool)
    start = time.perf_counter()
    model = from_pretrained(folder)
    load_s = time.perf_counter() - start
    rss_load = peak_rss_bytes()
    tokens = torch.randint(3, 50000, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first call is warmup
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
    forward_s = sorted(times[1:])[len(times[1:]) // 2]
    return {"load_s": load_s, "rss_load": rss_load, "tokens_per_s": n_tokens / forward_s, "rss_forward": peak_rss_bytes()}


# ---------------------------------------------------------------- main
def check_memory(quick: bool) -> None:
    import psutil

    available = psutil.virtual_memory().available
    if not quick and available < MIN_AVAILABLE_RAM:
        raise SystemExit(
            f"only {gib(available)} of RAM is available; the real-size run needs {gib(MIN_AVAILABLE_RAM)} "
            "(a 14 GB model per process). Run it when the machine is quiet, or use --quick."
        )


def table(results: dict[str, dict], checkpoint_bytes: int) -> str:
    rows = []
    for tool, r in results.items():
        if "error" in r:
            rows.append((tool, r["error"], "", "", "", ""))
            continue
        rows.append(
            (
                tool,
                f"{r['load_s']:.1f}",
                gib(r["rss_load"]),
                f"{r['rss_load'] / checkpoint_bytes:.3f}x",
                f"{r['tokens_per_s']:.1f}",
                gib(r["rss_forward"]),
            )
        )
    headers = ["tool", "load s", "peak RSS after load", "vs checkpoint bytes", "forward tokens/s", "peak RSS after forward"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 16 (~3.9 GB)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write the checkpoint")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2, help="timed forwards after one warmup")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steady on a shared machine)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--child", choices=["moe_hooked", "HF OlmoeForCausalLM"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.tokens, args.reps)))
        return
    check_memory(args.quick)
    cfg = OLMOE_1B_7B | (dict(num_hidden_layers=4) if args.quick else {})
    folder = Path(tempfile.mkdtemp(prefix="olmoe_1b_7b_random_", dir=args.dir))
    try:
        start = time.perf_counter()
        checkpoint_bytes = write_checkpoint(folder, cfg)
        print(f"wrote {gib(checkpoint_bytes)} in {time.perf_counter() - start:.0f} s to {folder}", flush=True)
        results = {}
        for tool in ("moe_hooked", "HF OlmoeForCausalLM"):
            extra = ["--tokens", str(args.tokens), "--reps", str(args.reps), "--threads", str(args.threads)]
            results[tool] = run_child([__file__, "--child", tool, "--folder", str(folder), *extra])
            print(tool, results[tool], flush=True)
    finally:
        shutil.rmtree(folder)
    layers = cfg["num_hidden_layers"]
    notes = (
        f"Random checkpoint with the shapes of OLMoE-1B-7B{' but 4 layers' if args.quick else ''} "
        f"({layers} layers), bfloat16, {gib(checkpoint_bytes)} of tensors in "
        f"{len(plan_shards(tensor_shapes(cfg)))} shards. One process per tool (ru_maxrss); forward: one "
        f"sequence of {args.tokens} tokens, median of {args.reps} after a warmup, bfloat16, inference mode, "
        f"{args.threads} torch thread(s). Load time excludes imports. "
        "Load times depend on how much of the files the page cache holds: the files were just written."
    )
    body = table(results, checkpoint_bytes)
    if args.no_report:
        print(body)
    else:
        report(f"Real-size loading{' (--quick)' if args.quick else ''}", body, notes)


if __name__ == "__main__":
    main()
