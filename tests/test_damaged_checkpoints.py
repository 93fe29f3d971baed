"""Damaged checkpoint files are refused with a `CheckpointError` naming the file, never half-loaded."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors
import torch
from hf_models import build_hf, olmoe_config, save_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moe_hooked import CheckpointError, HookedMoETransformer
from moe_hooked.loading.checkpoint import read_header, stream_weights
from moe_hooked.loading.llama_like import Target

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "b.weight": torch.linspace(-2, 2, 5).to(torch.bfloat16),
    "c.bias": torch.tensor([[[1.5, -0.25], [3.0, 4.0]], [[0.5, 6.0], [-7.0, 8.0]]], dtype=torch.float16),
}
PARAM_DTYPES = {"a.weight": torch.float32, "b.weight": torch.float32, "c.bias": torch.float16}
"""b.weight is read into a float32 parameter: the cast path of the reader, next to the in-place one."""


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    return path.read_bytes()


def load_with_moe_hooked(path) -> dict[str, torch.Tensor]:
    """Stream `path` through the library's reader into a module shaped like TENSORS."""
    module = torch.nn.Module()
    names = {}
    for i, (key, tensor) in enumerate(TENSORS.items()):
        module.register_parameter(f"p{i}", torch.nn.Parameter(torch.full(tensor.shape, 99.0, dtype=PARAM_DTYPES[key])))
        names[key] = Target(f"p{i}")
    stream_weights(module, [path], names)
    return {key: getattr(module, names[key].param).detach() for key in TENSORS}


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def test_intact_file_loads_exactly(original, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(original)
    loaded = load_with_moe_hooked(path)
    for key, tensor in TENSORS.items():
        assert torch.equal(loaded[key], tensor.to(PARAM_DTYPES[key]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_files_load_exactly_or_are_refused(original, tmp_path, data):
    """Random cuts anywhere and random byte flips in the header: the reader either
    loads exactly the original tensors or raises `CheckpointError`, nothing else."""
    damaged = bytearray(original)
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[: data.draw(st.integers(0, len(original) - 1), label="cut at")]
    else:
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            position = data.draw(st.integers(0, header_end(original) - 1), label="position")
            damaged[position] ^= data.draw(st.integers(1, 255), label="xor")
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(damaged))
    try:
        loaded = load_with_moe_hooked(path)
    except CheckpointError as err:
        assert str(tmp_path) in str(err)
        return
    for key, tensor in TENSORS.items():
        assert torch.equal(loaded[key], tensor.to(PARAM_DTYPES[key])), key


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10**6), xor=st.integers(1, 255))
def test_flipped_data_bytes_load_what_the_file_holds(original, tmp_path, position, xor):
    """No checksum guards the data section: a flip there loads the file's (damaged) values,
    exactly as the safetensors library reads them, never stale or uninitialised memory."""
    damaged = bytearray(original)
    start = header_end(original)
    damaged[start + position % (len(original) - start)] ^= xor
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(damaged))
    loaded, reference = load_with_moe_hooked(path), load_file(path)
    for key in TENSORS:
        expected = reference[key].to(PARAM_DTYPES[key])
        assert torch.equal(loaded[key].view(torch.uint8), expected.view(torch.uint8)), key


@pytest.fixture()
def folder(tmp_path):
    return save_hf(build_hf(olmoe_config()), tmp_path / "ckpt")


def test_checkpoint_cut_short_is_refused_as_safetensors_does(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(safetensors.SafetensorError):
        load_file(weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file: .*cut short"):
        HookedMoETransformer.from_pretrained(folder)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "too short to hold the 8-byte header size"),
        (struct.pack("<Q", 27) + b'{"a": {"dtype": "F32", "sha', "its header is not valid JSON"),
        (struct.pack("<Q", 10**9) + b"{}", r"its header claims 1000000000 bytes but 2 follow"),
        (struct.pack("<Q", 2) + b"[]", "its header is a JSON list, not an object"),
        (struct.pack("<Q", 2) + b"{}" + b"junk", "4 bytes follow the last tensor"),
    ],
)
def test_damaged_headers_name_the_file(folder, content, problem):
    weights = folder / "model.safetensors"
    weights.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(weights).replace(".", r"\.") + ".*" + problem):
        HookedMoETransformer.from_pretrained(folder)


def header_with(entries: dict) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    ("entries", "data_bytes", "problem"),
    [
        ({"x": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, "tensor 'x': .*unknown dtype 'F33'"),
        ({"x": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, 8, "tensor 'x': .*shape"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, r"tensor 'x': .*F32 x \[3\] needs 12 bytes"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "tensor 'y': .*overlaps"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "tensor 'x': .*gap"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 5, "cut short"),
    ],
)
def test_inconsistent_headers_name_file_and_tensor(tmp_path, entries, data_bytes, problem):
    path = tmp_path / "w.safetensors"
    path.write_bytes(header_with(entries) + bytes(data_bytes))
    with pytest.raises(CheckpointError, match=problem):
        read_header(path)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_config_that_is_not_a_json_object_names_the_file(folder, content):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"config\.json (is not valid JSON|holds a JSON list)"):
        HookedMoETransformer.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex64, torch.int32])
def test_unsupported_checkpoint_dtypes_are_refused_at_load(folder, dtype):
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"].to(dtype)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.gate\.weight': dtype \w+ is not supported.*F32, F16, BF16, F64"):
        HookedMoETransformer.from_pretrained(folder, dtype="float32")


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "complex64", "int32", torch.bool])
def test_unsupported_model_dtypes_are_refused(folder, dtype):
    with pytest.raises(ValueError, match="not supported for a model; supported are float32, bfloat16, float16, float64"):
        HookedMoETransformer.from_pretrained(folder, dtype=dtype)


def test_check_finite_lists_every_nan_and_inf_tensor(folder):
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.experts.3.up_proj.weight"][1, 2] = float("nan")
    tensors["model.layers.2.self_attn.q_proj.weight"][0, 0] = float("-inf")
    save_file(tensors, weights)
    assert not torch.isfinite(HookedMoETransformer.from_pretrained(folder).blocks[2].attn.W_Q).all()
    with pytest.raises(CheckpointError) as err:
        HookedMoETransformer.from_pretrained(folder, check_finite=True)
    assert "2 tensor(s) hold NaN or Inf" in str(err.value)
    assert "model.layers.0.mlp.experts.3.up_proj.weight (in model.safetensors)" in str(err.value)
    assert "model.layers.2.self_attn.q_proj.weight (in model.safetensors)" in str(err.value)


def test_revision_errors_say_it_is_the_revision(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    with pytest.raises(CheckpointError, match="revision='v2' applies to hub ids only"):
        HookedMoETransformer.from_pretrained(folder, revision="v2")
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-olmoe"
    save_hf(build_hf(olmoe_config()), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="revision 'v9' of 'someone/tiny-olmoe' is neither in the local cache"):
        HookedMoETransformer.from_pretrained("someone/tiny-olmoe", revision="v9")
