"""Routed experts streamed from disk (`from_pretrained(expert_memory=...)`): the offloaded model
equals the in-memory one bit for bit (logits and every hook, with interventions), the store
stays within its budget, reads only the experts the routing uses, and bad input is refused."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepseek_reference import build_reference, deepseek_config, write_checkpoint
from families import save_mxfp4_gpt_oss
from hf_models import build_hf, olmoe_config, qwen2_moe_config, save_hf
from safetensors.torch import load_file, save_file
from tiny import tiny_tokenizer

from moe_hooked import CheckpointError, HookedMoETransformer
from moe_hooked.cli import main
from moe_hooked.components.expert_store import parse_memory_budget
from moe_hooked.interventions import ablate_experts, keep_top_k, route_to
from moe_hooked.lens import expert_lens
from moe_hooked.loading import olmoe
from moe_hooked.loading.llama_like import Target


def write_olmoe(folder):
    save_hf(build_hf(olmoe_config()), folder, tiny_tokenizer())


def write_qwen2_moe(folder):  # layer 1 dense, gated shared expert
    save_hf(build_hf(qwen2_moe_config()), folder, tiny_tokenizer())


def write_deepseek(folder):  # layer 0 dense, shared experts, two shards
    config = deepseek_config()
    write_checkpoint(build_reference(config), config, folder, n_shards=2)


FAMILIES = {"olmoe": write_olmoe, "qwen2_moe": write_qwen2_moe, "deepseek": write_deepseek, "gpt_oss_mxfp4": save_mxfp4_gpt_oss}
"""Checkpoint writers of every kind of expert storage: one tensor per expert (olmoe, qwen2_moe,
deepseek, sharded), and all experts stacked in fused MXFP4 tensors with stacked biases (gpt-oss's
official layout). Every family's plain layout is also checked in `test_all_families.py`."""


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param](folder)
    return folder


@pytest.fixture(scope="module")
def olmoe_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("olmoe_single")
    write_olmoe(folder)
    return folder


def expert_bytes(model: HookedMoETransformer) -> int:
    """Bytes of one expert's weights (and biases) in the model's dtype, from the in-memory `model`."""
    experts = next(iter(model.moe_blocks.values())).experts
    return sum(getattr(experts, p)[0].numel() for p in experts.param_names) * model.cfg.dtype.itemsize


def stored_expert_bytes(folder: Path, model: HookedMoETransformer) -> int:
    """Bytes of one routed expert in the checkpoint files (MXFP4: its blocks and scales), from the
    safetensors headers: all routed-expert tensors' bytes over the number of (layer, expert) pairs."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(info["data_offsets"][1] - info["data_offsets"][0] for key, info in header.items() if ".experts." in key)
    return total // (len(model.cfg.moe_layers) * model.cfg.n_experts)


def tokens_and_mask(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 3 with right padding on two rows."""
    tokens = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return tokens, mask


def assert_same_run(reference, offloaded, fwd_hooks=(), all_experts=False):
    """Logits and every cached hook value of the two models are identical (torch.equal)."""
    tokens, mask = tokens_and_mask()
    results = []
    for model in (reference, offloaded):
        with model.hooks(fwd_hooks=list(fwd_hooks)), (model.all_experts() if all_experts else _nothing()):
            results.append(model.run_with_cache(tokens, attention_mask=mask))
    (logits_a, cache_a), (logits_b, cache_b) = results
    assert torch.equal(logits_a, logits_b)
    assert cache_a.keys() == cache_b.keys()
    for name in cache_a.keys():
        assert torch.equal(cache_a[name], cache_b[name]), name


def _nothing():
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("n_resident", [1, 3, None])
def test_offloaded_equals_in_memory(checkpoint, n_resident):
    """Budgets of one expert (each layer in groups of one), three, and all experts."""
    reference = HookedMoETransformer.from_pretrained(checkpoint)
    size = expert_bytes(reference)
    budget = size * (n_resident or reference.cfg.n_experts * len(reference.cfg.moe_layers))
    offloaded = HookedMoETransformer.from_pretrained(checkpoint, expert_memory=budget)
    for _ in range(2):  # cold, then with experts resident from the first pass
        assert_same_run(reference, offloaded)
    stats = offloaded.expert_memory_stats()
    assert stats["budget_bytes"] == budget and stats["slot_bytes"] == size  # slots hold experts as used (dequantized)
    assert 0 < stats["peak_resident_bytes"] <= budget
    assert stats["misses"] > 0
    assert stats["bytes_read"] == (stats["misses"] + stats["prefetched"]) * stored_expert_bytes(checkpoint, reference)
    if n_resident is None:  # the second pass found every expert resident
        assert stats["hits"] >= stats["misses"]


def test_hooks_that_edit_routing_weights_and_expert_outputs(checkpoint):
    reference = HookedMoETransformer.from_pretrained(checkpoint)
    offloaded = HookedMoETransformer.from_pretrained(checkpoint, expert_memory=2 * expert_bytes(reference))
    first, last = reference.cfg.moe_layers[0], reference.cfg.moe_layers[-1]

    def scale_expert_out(out, hook):
        return out * torch.linspace(0.5, 2.0, out.shape[-2])[:, None]

    hooks = (
        keep_top_k(reference, 1, layers=[first])
        + route_to(reference, last, [reference.cfg.n_experts - 1, 0])
        + ablate_experts(reference, {first: [1, 2]})
        + [(f"blocks.{last}.mlp.hook_expert_out", scale_expert_out)]
    )
    assert_same_run(reference, offloaded, hooks)


def test_all_experts_under_a_budget(checkpoint):
    reference = HookedMoETransformer.from_pretrained(checkpoint)
    offloaded = HookedMoETransformer.from_pretrained(checkpoint, expert_memory=3 * expert_bytes(reference))
    assert_same_run(reference, offloaded, all_experts=True)
    assert offloaded.expert_memory_stats()["peak_resident_bytes"] <= 3 * expert_bytes(reference)


def test_dtype_conversion(checkpoint):
    """A float32 (or MXFP4) checkpoint loaded as bfloat16: the store converts like the in-memory loader."""
    reference = HookedMoETransformer.from_pretrained(checkpoint, dtype="bfloat16")
    budget = expert_bytes(reference) + 100  # one bfloat16 expert resident at a time
    offloaded = HookedMoETransformer.from_pretrained(checkpoint, dtype="bfloat16", expert_memory=budget)
    assert offloaded.expert_memory_stats()["n_slots"] == 1
    assert_same_run(reference, offloaded)


def test_lens_runs_unchanged_on_an_offloaded_model(olmoe_checkpoint):
    reference = HookedMoETransformer.from_pretrained(olmoe_checkpoint)
    offloaded = HookedMoETransformer.from_pretrained(olmoe_checkpoint, expert_memory=3 * expert_bytes(reference))
    tables = [expert_lens(m, m.run_with_cache("The cat sat on the mat")[1]) for m in (reference, offloaded)]
    assert tables[0].equals(tables[1])


# ----------------------------------------------------------------------------- what is read
def offloaded_without_prefetch(folder, budget="1GiB") -> HookedMoETransformer:
    model = HookedMoETransformer.from_pretrained(folder, expert_memory=budget)
    model.expert_store.prefetch_enabled = False
    return model


def used_experts(model: HookedMoETransformer, hooks=()) -> int:
    """Number of (layer, expert) pairs with a non-zero weight for some real token."""
    tokens, mask = tokens_and_mask()
    with model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    total = 0
    for layer in model.cfg.moe_layers:
        indices, weights = cache[f"blocks.{layer}.mlp.hook_topk_indices"], cache[f"blocks.{layer}.mlp.hook_topk_weights"]
        total += indices[(weights != 0)].unique().numel()
    return total


def test_reads_exactly_the_used_experts_and_keep_top_k_reads_fewer(olmoe_checkpoint):
    reference = HookedMoETransformer.from_pretrained(olmoe_checkpoint)
    size = expert_bytes(reference)
    bytes_read = {}
    for k in (reference.cfg.top_k, 1):
        hooks = keep_top_k(reference, k)
        model = offloaded_without_prefetch(olmoe_checkpoint)
        tokens, mask = tokens_and_mask()
        with model.hooks(fwd_hooks=hooks):
            model(tokens, attention_mask=mask)
        stats = model.expert_memory_stats()
        assert stats["bytes_read"] == used_experts(reference, hooks) * size
        assert stats["misses"] == used_experts(reference, hooks) and stats["hits"] == 0
        bytes_read[k] = stats["bytes_read"]
    assert bytes_read[1] < bytes_read[reference.cfg.top_k]


def test_lru_eviction_counts(olmoe_checkpoint):
    """With room for every expert the second pass reads nothing; with room for one it reads again."""
    reference = HookedMoETransformer.from_pretrained(olmoe_checkpoint)
    tokens, mask = tokens_and_mask()
    for budget, second_pass_reads in (("1GiB", False), (expert_bytes(reference), True)):
        model = offloaded_without_prefetch(olmoe_checkpoint, budget)
        model(tokens, attention_mask=mask)
        first = model.expert_memory_stats()
        model(tokens, attention_mask=mask)
        second = model.expert_memory_stats()
        assert (second["bytes_read"] > first["bytes_read"]) == second_pass_reads
        assert second["hits"] + second["misses"] == 2 * (first["hits"] + first["misses"])


def test_prefetch_statistics_are_consistent(olmoe_checkpoint):
    model = HookedMoETransformer.from_pretrained(olmoe_checkpoint, expert_memory="1GiB")
    tokens, mask = tokens_and_mask()
    model(tokens, attention_mask=mask)
    stats = model.expert_memory_stats()
    size = stats["slot_bytes"]
    assert stats["prefetched"] > 0  # layer 0 predicted layer 1's experts, layer 1 layer 2's
    assert stats["hits"] == stats["prefetch_hits"] <= stats["prefetched"]  # a cold store hits only what was read ahead
    assert stats["bytes_read"] == (stats["misses"] + stats["prefetched"]) * size
    assert stats["prefetch_hit_rate"] == stats["prefetch_hits"] / stats["prefetched"]


# ----------------------------------------------------------------------------- budgets and bad input
@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("800 mb", 800_000_000), (4096, 4096)],
)
def test_budget_strings(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("bad", ["two gigs", "2 GiBs", "-1GB", 0, -5, True, 1.5])
def test_unreadable_budget_is_refused(olmoe_checkpoint, bad):
    with pytest.raises(ValueError, match="expert_memory"):
        HookedMoETransformer.from_pretrained(olmoe_checkpoint, expert_memory=bad)


def test_budget_smaller_than_one_expert_names_the_minimum(olmoe_checkpoint):
    size = expert_bytes(HookedMoETransformer.from_pretrained(olmoe_checkpoint))
    with pytest.raises(ValueError, match=f"smaller than one expert.*expert_memory={size}"):
        HookedMoETransformer.from_pretrained(olmoe_checkpoint, expert_memory=size - 1)


@pytest.mark.parametrize("change", ["mtime", "size"])
def test_file_changed_on_disk_after_loading(tmp_path, change):
    write_olmoe(tmp_path)
    model = HookedMoETransformer.from_pretrained(tmp_path, expert_memory="1GiB")
    weights = tmp_path / "model.safetensors"
    stat = weights.stat()
    if change == "size":  # bytes appended, modification time put back
        with open(weights, "ab") as f:
            f.write(bytes(8))
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="changed on disk after the model was loaded"):
        model(tokens_and_mask()[0])
    with pytest.raises(CheckpointError, match="changed on disk after the model was loaded"):
        model.blocks[0].mlp.experts.expert_weights(0)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32])
def test_expert_dtype_that_cannot_be_streamed_is_refused_at_load(tmp_path, dtype):
    """Refused by from_pretrained, as the in-memory load refuses it, not at the first forward pass."""
    write_olmoe(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, weights)
    for budget in (None, "1GiB"):
        with pytest.raises(CheckpointError, match=rf"tensor '{key}': dtype \w+ is not supported"):
            HookedMoETransformer.from_pretrained(tmp_path, expert_memory=budget)


def test_mismatched_mxfp4_scales_are_refused_at_load(tmp_path):
    save_mxfp4_gpt_oss(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[key] = tensors[key][..., :-1].contiguous()
    save_file(tensors, weights)
    for budget in (None, "1GiB"):
        with pytest.raises(CheckpointError, match="MXFP4 blocks U8 .* and scales U8 .* do not fit together"):
            HookedMoETransformer.from_pretrained(tmp_path, expert_memory=budget)


def test_expert_tensor_neither_per_expert_nor_stacked_is_refused(olmoe_checkpoint, monkeypatch):
    """A weight map that sends one expert's tensor to the whole stacked parameter."""

    own_names = olmoe.weight_names

    def fused(cfg):
        names = own_names(cfg)
        names["model.layers.0.mlp.experts.0.gate_proj.weight"] = Target("blocks.0.mlp.experts.W_gate")
        return names

    monkeypatch.setattr(olmoe, "weight_names", fused)
    with pytest.raises(CheckpointError, match="must be stacked along its first dim"):
        HookedMoETransformer.from_pretrained(olmoe_checkpoint, expert_memory="1GiB")


def test_stats_of_an_in_memory_model_are_refused(olmoe_checkpoint):
    with pytest.raises(ValueError, match="expert_memory"):
        HookedMoETransformer.from_pretrained(olmoe_checkpoint).expert_memory_stats()


# ----------------------------------------------------------------------------- one expert's weights
def test_expert_weights_equal_the_stacked_slices(checkpoint):
    """`expert_weights(e)`: the in-memory stacked slice, in memory and offloaded (read outside any
    forward pass, under a one-expert budget, counted in the statistics); copies either way."""
    reference = HookedMoETransformer.from_pretrained(checkpoint)
    offloaded = offloaded_without_prefetch(checkpoint, expert_bytes(reference))
    for layer in reference.cfg.moe_layers:
        stacked = reference.blocks[layer].mlp.experts
        for e in (0, reference.cfg.n_experts - 1):
            expected = {name: getattr(stacked, name)[e] for name in stacked.param_names}
            for model in (reference, offloaded):
                weights = model.blocks[layer].mlp.experts.expert_weights(e)
                assert weights.keys() == expected.keys()
                for name, tensor in weights.items():
                    assert torch.equal(tensor, expected[name]), (layer, e, name)
                    tensor.zero_()
            assert torch.equal(stacked.W_in[e], offloaded.blocks[layer].mlp.experts.expert_weights(e)["W_up"].T)
    stats = offloaded.expert_memory_stats()
    n_read = 2 * len(reference.cfg.moe_layers)  # each expert read once, then found resident for the W_in check
    assert stats["misses"] == stats["hits"] == n_read and stats["bytes_read"] == n_read * stored_expert_bytes(checkpoint, reference)
    assert stats["peak_resident_bytes"] == stats["slot_bytes"]
    assert_same_run(reference, offloaded)  # the zeroed copies changed neither model


@pytest.mark.parametrize("bad", [-1, 8, 2.0, True, "0"])
def test_expert_weights_of_a_missing_expert_is_refused(olmoe_checkpoint, bad):
    model = HookedMoETransformer.from_pretrained(olmoe_checkpoint)
    with pytest.raises(ValueError, match=r"valid ids are 0\.\.7"):
        model.blocks[0].mlp.experts.expert_weights(bad)


@pytest.mark.parametrize("name", ["W_in", "W_gate_in", "W_out", "W_gate", "W_up", "W_down"])
def test_stacked_weights_of_offloaded_experts_say_how_to_read_one(olmoe_checkpoint, name):
    experts = HookedMoETransformer.from_pretrained(olmoe_checkpoint, expert_memory="1GiB").blocks[1].mlp.experts
    with pytest.raises(AttributeError, match=rf"blocks\.1\.mlp\.experts\.{name}: the routed experts of this model "
                       r"are offloaded \(loaded with expert_memory=\.\.\.\).*blocks\.1\.mlp\.experts\.expert_weights\(e\)"):
        getattr(experts, name)
    assert not hasattr(experts, name)
    with pytest.raises(AttributeError, match="has no attribute 'W_nonexistent'"):
        experts.W_nonexistent


# ----------------------------------------------------------------------------- peak RSS, in a subprocess
RSS_CHILD = """
import sys, torch
from moe_hooked import HookedMoETransformer
budget = None if sys.argv[2] == "none" else sys.argv[2]
model = HookedMoETransformer.from_pretrained(sys.argv[1], expert_memory=budget)
with torch.inference_mode():
    model(torch.arange(3, 67)[None])
# VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a big
# pytest process would report at least its parent's size
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def write_big_olmoe(folder, n_layers: int = 4, n_experts: int = 40, d: int = 1024) -> int:
    """An OLMoE checkpoint in bfloat16 with `n_layers * n_experts` experts of 3 d x d matrices
    (6 MiB each at d = 1024): every expert tensor repeats one random block, so writing it
    needs 2 MiB of memory. Returns the bytes of expert weights."""
    from transformers import OlmoeConfig

    OlmoeConfig(vocab_size=128, hidden_size=d, intermediate_size=d, num_hidden_layers=n_layers, num_attention_heads=8,
                num_experts=n_experts, num_experts_per_tok=2, dtype="bfloat16").save_pretrained(folder)
    block = (0.02 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    weight_map = olmoe.weight_names(olmoe.config_from_hf(OlmoeConfig.from_pretrained(folder).to_dict()))
    shapes = {key: (128, d) if "embed" in key or "lm_head" in key else (n_experts, d) if key.endswith("gate.weight")
              else (d,) if "norm" in key else (d, d) for key in weight_map}
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape in shapes.values():  # no tensor is larger than d x d
            f.write(block.flatten()[: torch.Size(shape).numel()].view(torch.int16).numpy().tobytes())
    return n_layers * n_experts * 3 * d * d * 2


def peak_rss(folder, budget: str) -> int:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder), budget], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_peak_rss_drops_by_the_offloaded_bytes(tmp_path):
    """~1 GB of experts under a 128 MiB budget: the process's peak RSS drops by at least
    80% of (expert bytes - budget) against loading everything into memory."""
    expert_bytes_total = write_big_olmoe(tmp_path)
    try:
        in_memory, offloaded = peak_rss(tmp_path, "none"), peak_rss(tmp_path, "128MiB")
    finally:
        shutil.rmtree(tmp_path)
    assert in_memory - offloaded >= 0.8 * (expert_bytes_total - 128 * 2**20), (in_memory, offloaded)


# ----------------------------------------------------------------------------- CLI
def test_report_cli_passes_the_budget_through(olmoe_checkpoint, tmp_path, capsys):
    """`moe-hooked report --expert-memory`: the same routing counts as in memory, the budget recorded."""
    corpus = tmp_path / "english.txt"
    corpus.write_text("The cat sat on the mat and looked at the moon.\nRouters send each token to a few experts.\n")
    outs = {}
    for budget in (None, "20KiB"):
        outs[budget] = tmp_path / f"report-{budget}"
        argv = ["report", "--model", str(olmoe_checkpoint), "--corpus", f"english={corpus}", "--max-tokens", "24",
                "--out", str(outs[budget])] + (["--expert-memory", budget] if budget else [])
        assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((outs["20KiB"] / "report.json").read_text())["options"]["expert_memory"] == "20KiB"
    assert (outs["20KiB"] / "counts.json").read_text() == (outs[None] / "counts.json").read_text()
    assert main(["report", "--model", str(olmoe_checkpoint), "--expert-memory", "lots", "--out", str(tmp_path / "x")]) == 2
    assert "cannot read expert_memory='lots'" in capsys.readouterr().err
