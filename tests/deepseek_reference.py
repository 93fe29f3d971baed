"""A tiny DeepSeekMoE v1 reference built from transformers' own modules, and a writer
of its checkpoint in the real hub layout (config.json with `model_type` "deepseek",
safetensors with one tensor per expert, optionally sharded with an index).

transformers has no DeepSeekMoE v1 class, so the reference is a `LlamaForCausalLM`
(DeepSeekMoE's attention, norms and dense MLP are Llama's) whose MLP in every MoE
layer is transformers' `DeepseekV2Moe` with greedy top-k, `routed_scaling_factor` 1
and `n_shared_experts` merged shared experts. Two differences of `DeepseekV2TopkRouter`
from DeepSeekMoE v1's gate, and how the reference handles them:

- it computes the router logits and softmax in float32 where v1 uses the model dtype:
  identical in float32, which is the dtype of the parity tests;
- it ignores `norm_topk_prob`: when the config sets it, `build_reference` adds a forward
  hook on each gate applying v1's w / (sum w + 1e-20) (v1 renormalises only when top-k > 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from hf_models import perturb_

V1_NORM_EPS = 1e-20


def deepseek_config(**overrides) -> dict:
    """A tiny config.json of DeepSeekMoE v1, with the field names of the real checkpoints.

    Layer 0 is dense (`first_k_dense_replace` 1); the other layers are MoE.
    """
    config = dict(
        architectures=["DeepseekForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModel": "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
        model_type="deepseek",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        hidden_act="silu",
        max_position_embeddings=64,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_theta=10000,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        pretraining_tp=1,
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
        transformers_version="4.36.0",
    )
    return config | overrides


def moe_layers(config: dict) -> list[int]:
    """DeepSeekMoE v1's rule: layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    return [
        i
        for i in range(config["num_hidden_layers"])
        if i >= config["first_k_dense_replace"] and i % config["moe_layer_freq"] == 0
    ]


def _llama_config(config: dict) -> LlamaConfig:
    llama = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        hidden_act=config["hidden_act"],
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(config["rope_theta"])},
        tie_word_embeddings=config["tie_word_embeddings"],
        bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"],
    )
    llama._attn_implementation = "eager"
    return llama


def _moe_config(config: dict) -> DeepseekV2Config:
    moe = DeepseekV2Config(
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        hidden_act=config["hidden_act"],
        n_routed_experts=config["n_routed_experts"],
        n_shared_experts=config["n_shared_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        moe_intermediate_size=config["moe_intermediate_size"],
        norm_topk_prob=config["norm_topk_prob"],
        topk_method="greedy",
        routed_scaling_factor=1.0,
    )
    moe._experts_implementation = "eager"
    return moe


def _renormalise_topk(gate: torch.nn.Module, inputs, output):
    """Forward hook on a `DeepseekV2TopkRouter`: DeepSeekMoE v1's top-k renormalisation."""
    logits, weights, indices = output
    return logits, weights / (weights.sum(dim=-1, keepdim=True) + V1_NORM_EPS), indices


def build_reference(config: dict, seed: int = 0, scale: float = 0.15) -> LlamaForCausalLM:
    """The reference model of a `deepseek_config`, with random weights of std `scale`
    (so that activations are O(1) at this width), perturbed norm gains and spread routers."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(config))
    renormalise = config["norm_topk_prob"] and config["num_experts_per_tok"] > 1
    for layer in moe_layers(config):
        model.model.layers[layer].mlp = DeepseekV2Moe(_moe_config(config))
        if renormalise:
            model.model.layers[layer].mlp.gate.register_forward_hook(_renormalise_topk)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(scale * torch.randn(param.shape, generator=generator))
    return perturb_(model, seed).eval()


def hub_state_dict(reference: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The reference's tensors under the hub's names: the fused `experts.gate_up_proj`
    [E, 2I, D] and `experts.down_proj` [E, D, I] split into per-expert
    `experts.{e}.{gate,up,down}_proj.weight`."""
    tensors = {}
    for name, tensor in reference.state_dict().items():
        prefix, _, leaf = name.rpartition("experts.")
        if leaf == "gate_up_proj":
            for e, (gate, up) in enumerate(zip(*tensor.chunk(2, dim=1))):
                tensors[f"{prefix}experts.{e}.gate_proj.weight"] = gate
                tensors[f"{prefix}experts.{e}.up_proj.weight"] = up
        elif leaf == "down_proj":
            for e, down in enumerate(tensor):
                tensors[f"{prefix}experts.{e}.down_proj.weight"] = down
        else:
            tensors[name] = tensor
    return {name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}


def write_checkpoint(
    reference: LlamaForCausalLM, config: dict, folder: Path, n_shards: int = 1, dtype: torch.dtype | None = None
) -> Path:
    """Save `config` and the reference's weights in the hub layout into `folder`.

    One `model.safetensors`, or with `n_shards > 1` the files
    `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`. With `dtype`, the
    tensors are stored in it and config.json's `torch_dtype` says so (as `save_pretrained` does).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hub_state_dict(reference)
    if dtype is not None:
        tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
        config = config | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if n_shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names = list(tensors)
    shard_size = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i * shard_size : (i + 1) * shard_size]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_word_tokenizer(folder: Path, words: list[str], bos: str = "<s>", eos: str = "</s>") -> None:
    """A whitespace word-level tokenizer (ids: "<unk>" 0, `bos` 1, `eos` 2, then `words`),
    saved as tokenizer.json + tokenizer_config.json so that `AutoTokenizer` loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", bos, eos, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token=bos, eos_token=eos)
    fast.save_pretrained(str(folder))
