"""One GPU check, under 8 minutes on one GPU, printing markdown tables:

1. per architecture (olmoe, qwen2_moe, deepseek; mid-size random models saved in the hub layout),
   float32 and bfloat16: max |logit difference| against the HF reference on the GPU, top-1 agreement,
   and forward / full `run_with_cache` time against HF's forward;
2. a random DeepSeekMoE-16B-shaped bfloat16 checkpoint (32.8 GB, written on the fly and deleted):
   tokens/s with the routed experts offloaded (`expert_memory`) under
   `torch.cuda.set_per_process_memory_fraction` emulating a 16 GB card, against the same model all in
   GPU memory where it fits;
3. `torchrun -m moe_hooked report` with one process per GPU (NCCL, `cuda:LOCAL_RANK`) against
   `python -m moe_hooked report` on one GPU: routing counts equal, the backend recorded, seconds.

Without CUDA it says so and exits (status 0); `--dry-run` runs every step on the CPU at toy sizes
(a 2-layer DeepSeekMoE-shaped checkpoint) to check the script itself.

    python benchmarks/gpu_check.py [--dry-run] [--dir /tmp] [--card-gb 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, markdown_table
from offload import DEEPSEEK_MOE_16B, deepseek_shapes
from real_size_loading import write_checkpoint

sys.path.insert(0, str(REPO / "tests"))
from deepseek_reference import build_reference, deepseek_config  # noqa: E402
from deepseek_reference import write_checkpoint as write_deepseek  # noqa: E402
from hf_models import build_hf, olmoe_config, qwen2_moe_config, save_hf  # noqa: E402

from moe_hooked import HookedMoETransformer  # noqa: E402

MID = dict(vocab_size=8000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
           max_position_embeddings=1024)
TOY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
           max_position_embeddings=64)


def references(size: dict) -> dict[str, tuple]:
    """Architecture -> (HF reference model in float32, writer of its checkpoint into a folder)."""
    olmoe = build_hf(olmoe_config(**size, intermediate_size=1024, num_experts=32, num_experts_per_tok=4))
    qwen = build_hf(qwen2_moe_config(**size, intermediate_size=2048, moe_intermediate_size=512,
                                     shared_expert_intermediate_size=1024, num_experts=32, num_experts_per_tok=4))
    ds_config = deepseek_config(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
                                num_hidden_layers=size["num_hidden_layers"], max_position_embeddings=size["max_position_embeddings"],
                                num_attention_heads=size["num_attention_heads"], num_key_value_heads=size["num_key_value_heads"],
                                intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=32)
    deepseek = build_reference(ds_config)
    return {
        "olmoe": (olmoe, lambda folder: save_hf(olmoe, folder)),
        "qwen2_moe": (qwen, lambda folder: save_hf(qwen, folder)),
        "deepseek": (deepseek, lambda folder: write_deepseek(deepseek, ds_config, folder)),
    }


def median_seconds(fn, device: torch.device, reps: int = 5) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(reps + 2):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def parity_rows(device: torch.device, size: dict, tokens_shape: tuple[int, int], workdir: Path) -> list[tuple]:
    rows = []
    tokens = torch.randint(3, size["vocab_size"], tokens_shape, generator=torch.Generator().manual_seed(0)).to(device)
    for arch, (hf_float32, write) in references(size).items():
        folder = workdir / arch
        write(folder)
        for dtype in (torch.float32, torch.bfloat16):
            hf = hf_float32.to(dtype=dtype, device=device)
            ours = HookedMoETransformer.from_pretrained(folder, dtype=dtype, device=device)
            with torch.inference_mode():
                expected, got = hf(tokens).logits.float(), ours(tokens).float()
                hf_s = median_seconds(lambda: hf(tokens), device)
                forward_s = median_seconds(lambda: ours(tokens), device)
                cache_s = median_seconds(lambda: ours.run_with_cache(tokens), device)
            agree = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
            rows.append((arch, str(dtype).removeprefix("torch."), f"{(expected - got).abs().max().item():.2e}",
                         f"{agree:.1%}", f"{forward_s / hf_s:.2f}x", f"{cache_s / hf_s:.2f}x", f"{hf_s * 1e3:.1f}"))
            del hf, ours
        hf_float32.to("cpu")
    return rows


def tokens_per_s(folder: Path, device: torch.device, n_tokens: int, **load) -> tuple[float, dict]:
    model = HookedMoETransformer.from_pretrained(folder, device=device, **load)
    tokens = torch.randint(3, model.cfg.d_vocab, (1, n_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        seconds = median_seconds(lambda: model(tokens), device, reps=2)
    stats = model.expert_memory_stats() if model.expert_store is not None else {}
    del model
    return n_tokens / seconds, stats


def offload_rows(device: torch.device, cfg: dict, card_bytes: int, budget: str, n_tokens: int, workdir: Path) -> list[tuple]:
    folder = workdir / "deepseek_16b"
    folder.mkdir()
    rows = []
    try:
        total = write_checkpoint(folder, cfg, deepseek_shapes(cfg))
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(card_bytes / torch.cuda.get_device_properties(device).total_memory, device)
        try:
            speed, stats = tokens_per_s(folder, device, n_tokens, expert_memory=budget)
            rows.append((f"offloaded, expert_memory={budget}, memory capped at {card_bytes / 1e9:.0f} GB", f"{speed:.1f}",
                         f"{stats['prefetch_hit_rate']:.0%}", f"{stats['bytes_read'] / n_tokens / 2**20:.1f}"))
        finally:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                torch.cuda.empty_cache()
        try:
            speed, _ = tokens_per_s(folder, device, n_tokens)
            rows.append(("all in memory", f"{speed:.1f}", "-", "-"))
        except torch.OutOfMemoryError:
            rows.append(("all in memory", "does not fit", "-", "-"))
        rows.append(("checkpoint", f"{total / 1e9:.1f} GB of tensors", "", ""))
    finally:
        shutil.rmtree(folder)
    return rows


def distributed_rows(device: torch.device, workdir: Path) -> list[tuple]:
    """The default report (128 tokens per domain) by `torchrun`, one process per GPU (NCCL), and by
    one process: whether the routing counts are equal, the backend the report records, and the
    wall time of each. On the CPU (dry run): two gloo processes."""
    n_procs = torch.cuda.device_count() if device.type == "cuda" else 2
    report = ["report", "--max-tokens", "128", "--device", device.type]
    runs = {
        f"torchrun, {n_procs} process(es)": ["-m", "torch.distributed.run", "--nproc-per-node", str(n_procs), "-m", "moe_hooked"],
        "one process": ["-m", "moe_hooked"],
    }
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rows, counts = [], {}
    for name, launcher in runs.items():
        out = workdir / name.replace(" ", "_").replace(",", "")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *launcher, *report, "--out", str(out)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            rows.append((name, f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}", "", f"{seconds:.0f}"))
            continue
        counts[name] = (out / "counts.json").read_text()
        meta = json.loads((out / "report.json").read_text())
        rows.append((name, meta["options"]["world_size"], meta["options"]["backend"], f"{seconds:.0f}"))
    equal = len(set(counts.values())) == 1 and len(counts) == len(runs)
    rows.append(("routing counts equal", "yes" if equal else "NO", "", ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, to check the script")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--card-gb", type=float, default=16.0)
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured (use --dry-run to check the script on the CPU)")
        return
    device = torch.device("cpu" if args.dry_run else "cuda")
    size, shape = (TOY, (2, 16)) if args.dry_run else (MID, (4, 256))
    cfg = DEEPSEEK_MOE_16B | (dict(num_hidden_layers=2, vocab_size=1000) if args.dry_run else {})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        parity = parity_rows(device, size, shape, Path(workdir))
        print(markdown_table(["architecture", "dtype", "max |logit diff| vs HF", "top-1 agreement",
                              "forward / HF forward", "run_with_cache / HF forward", "HF forward ms"], parity), flush=True)
        budget = "64MiB" if args.dry_run else "8GiB"
        offload = offload_rows(device, cfg, int(args.card_gb * 1e9), budget, 16 if args.dry_run else 512, Path(workdir))
        print()
        print(markdown_table(["DeepSeekMoE-16B shapes, bfloat16", "tokens/s", "prefetch hit rate", "MiB read / token"], offload))
        print()
        print(markdown_table(["report run", "world size", "backend", "seconds"], distributed_rows(device, Path(workdir))), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"\n{name}, {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
