"""Loading real-format checkpoints, and the errors for bad ones."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from hf_models import build_hf, olmoe_config, qwen2_moe_config, save_hf
from safetensors.torch import load_file, save_file

import moe_hooked.loading as loading
from moe_hooked import CheckpointError, HookedMoETransformer, UnsupportedArchitectureError


@pytest.fixture(scope="module")
def hf_olmoe():
    return build_hf(olmoe_config())


@pytest.fixture()
def folder(hf_olmoe, tmp_path):
    return save_hf(hf_olmoe, tmp_path / "ckpt")


def logits_match(hf, model, atol=1e-4) -> bool:
    tokens = torch.randint(0, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return bool((hf(tokens).logits - model(tokens)).abs().max() <= atol)


def test_sharded_checkpoint_loads(tmp_path):
    hf = build_hf(qwen2_moe_config())
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert logits_match(hf, HookedMoETransformer.from_pretrained(tmp_path))


def test_hub_id_resolves_from_the_local_cache_offline(hf_olmoe, tmp_path, monkeypatch):
    """A hub id is looked up through huggingface_hub, which honours its cache and offline mode."""
    import huggingface_hub.constants as hub_constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-olmoe"
    save_hf(hf_olmoe, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert logits_match(hf_olmoe, HookedMoETransformer.from_pretrained("someone/tiny-olmoe"))
    with pytest.raises(CheckpointError, match="neither a local checkpoint folder nor a model"):
        HookedMoETransformer.from_pretrained("someone/not-there")


def test_unknown_model_type_names_the_supported_ones(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "jamba"}))
    with pytest.raises(UnsupportedArchitectureError, match=r"'jamba' is not supported; supported are \[.*'olmoe'.*'qwen2_moe'"):
        HookedMoETransformer.from_pretrained(folder)


def test_folder_without_config_or_weights(folder, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        HookedMoETransformer.from_pretrained(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        HookedMoETransformer.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        HookedMoETransformer.from_pretrained(str(tmp_path / "does-not-exist"))


def test_pickled_weights_are_refused_without_unpickling(folder, monkeypatch):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors only"):
        HookedMoETransformer.from_pretrained(folder)


def test_missing_unexpected_and_misshapen_tensors_are_listed_together(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.0.mlp.experts.99.up_proj.weight"] = torch.zeros(24, 32)
    tensors["model.layers.2.mlp.gate.weight"] = torch.zeros(7, 32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        HookedMoETransformer.from_pretrained(folder)
    message = str(err.value)
    assert "1 missing tensor(s):\n  model.layers.1.mlp.experts.3.up_proj.weight" in message
    assert "1 unexpected tensor(s):\n  model.layers.0.mlp.experts.99.up_proj.weight" in message
    assert "1 misshapen tensor(s):\n  model.layers.2.mlp.gate.weight: (7, 32), expected (8, 32)" in message


def test_shard_named_in_index_but_absent(tmp_path):
    build_hf(olmoe_config()).save_pretrained(tmp_path, max_shard_size="20KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="shard files that are missing"):
        HookedMoETransformer.from_pretrained(tmp_path)


def test_model_without_tokenizer_takes_tokens_but_not_text(hf_olmoe, folder):
    model = HookedMoETransformer.from_pretrained(folder)
    assert model.tokenizer is None
    assert logits_match(hf_olmoe, model)
    with pytest.raises(ValueError, match="has no tokenizer.*pass token ids"):
        model("some text")


def test_unknown_dtype_and_router_dtype(folder):
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        HookedMoETransformer.from_pretrained(folder, dtype="float7")
    with pytest.raises(ValueError, match="router_dtype must be 'float32' or 'model'"):
        HookedMoETransformer.from_pretrained(folder, router_dtype="half")


def test_weights_are_not_randomly_initialised_before_streaming(folder, monkeypatch):
    """The model is built on the meta device: no parameter is materialised before the copy."""
    materialised = []
    original = loading._materialize

    def spy(model, device):
        materialised.extend(p.device.type for p in model.parameters())
        return original(model, device)

    monkeypatch.setattr(loading, "_materialize", spy)
    model = HookedMoETransformer.from_pretrained(folder)
    assert materialised and set(materialised) == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_materialize_gives_meta_tensors_storage_as_to_empty_does():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4, dtype=torch.bfloat16), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    model[0].register_buffer("kept", torch.zeros(2, dtype=torch.int64))
    model[1].register_buffer("scratch", torch.zeros(5), persistent=False)
    reference = copy.deepcopy(model).to_empty(device="cpu")
    loading._materialize(model, torch.device("cpu"))
    assert model.state_dict().keys() == reference.state_dict().keys()  # the non-persistent buffer stays out
    for (name, got), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        assert (got.device, got.shape, got.dtype, got.requires_grad) == (expected.device, expected.shape,
                                                                         expected.dtype, expected.requires_grad), name
    for (name, got), (_, expected) in zip(model.named_buffers(), reference.named_buffers()):
        assert (got.device, got.shape, got.dtype) == (expected.device, expected.shape, expected.dtype), name


def test_unsupported_rope_scaling(folder):
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="RoPE scaling 'linear' .* is not supported"):
        HookedMoETransformer.from_pretrained(folder)
    shutil.rmtree(folder)
