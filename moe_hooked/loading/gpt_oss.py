"""gpt-oss (`model_type` "gpt_oss", e.g. openai/gpt-oss-20b, openai/gpt-oss-120b).

Differences from Llama:

- RMSNorm: the gain multiplies the float32 normalized value, before the cast back;
- attention: q/k/v/o biases; a learned sink logit per head joining the softmax
  (`self_attn.sinks`); layers alternate sliding-window and full attention as `layer_types`
  says; YaRN RoPE;
- every layer is MoE, without shared expert: the router has a bias
  (`mlp.router.{weight,bias}`), the weights are the softmax over the k largest logits, in
  the logits' dtype (= the top-k of the softmax over all experts, renormalised:
  `norm_topk_prob`, but rounded as the reference rounds it: `router_topk_softmax`);
- experts have biases and the clamped SwiGLU (up + 1) * g * sigmoid(alpha g), g and up
  clamped at `swiglu_limit`; they are stored fused: `mlp.experts.gate_up_proj`
  [E, d_model, 2 d_expert] with gate and up columns interleaved (gate even, up odd),
  `down_proj` [E, d_expert, d_model], biases `gate_up_proj_bias`, `down_proj_bias`; the
  official checkpoints store `gate_up_proj` and `down_proj` in MXFP4 (`*_blocks`,
  `*_scales`), dequantized while streaming (`loading/mxfp4.py`).
"""

from __future__ import annotations

from transformers import GptOssConfig

from moe_hooked.config import MoEConfig
from moe_hooked.loading import llama_like, mixtral
from moe_hooked.loading.errors import UnsupportedArchitectureError
from moe_hooked.loading.llama_like import Target

MODEL_TYPE = "gpt_oss"
PREPENDS_BOS = False
LAYER_TYPES = ("sliding_attention", "full_attention")
GATE, UP = (0, 2), (1, 2)
"""Column (offset, step) of the gate and the up projection in the fused gate_up tensors."""
MOE_WEIGHTS = {
    "mlp.router.weight": Target("mlp.router.weight"),
    "mlp.router.bias": Target("mlp.router.bias"),
    "mlp.experts.gate_up_proj": (
        Target("mlp.experts.W_gate", interleave=GATE, transpose=True),
        Target("mlp.experts.W_up", interleave=UP, transpose=True),
    ),
    "mlp.experts.gate_up_proj_bias": (
        Target("mlp.experts.b_gate", interleave=GATE),
        Target("mlp.experts.b_up", interleave=UP),
    ),
    "mlp.experts.down_proj": Target("mlp.experts.W_down", transpose=True),
    "mlp.experts.down_proj_bias": Target("mlp.experts.b_down"),
}


def _check_supported(hf: GptOssConfig) -> None:
    unknown = sorted(set(hf.layer_types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedArchitectureError(f"gpt_oss layer_types {unknown} are not supported (known: {list(LAYER_TYPES)})")
    quantization = (getattr(hf, "quantization_config", None) or {}).get("quant_method")
    if quantization not in (None, "mxfp4"):
        raise UnsupportedArchitectureError(
            f"gpt_oss quantization '{quantization}' is not supported: moe_hooked reads unquantized and MXFP4 checkpoints"
        )


def config_from_hf(raw: dict) -> MoEConfig:
    hf = GptOssConfig.from_dict(raw)
    _check_supported(hf)
    sliding = [layer for layer, kind in enumerate(hf.layer_types) if kind == "sliding_attention"]
    return MoEConfig(
        architecture=MODEL_TYPE,
        **llama_like.common_fields(hf.to_dict()),
        **mixtral.routing_fields(hf),
        router_bias=True,
        router_topk_softmax=True,
        expert_bias=True,
        swiglu_limit=hf.swiglu_limit,
        swiglu_alpha=hf.swiglu_alpha,
        qkv_bias=hf.attention_bias,
        o_bias=hf.attention_bias,
        attn_sinks=True,
        norm_gain_float32=True,
        **llama_like.sliding_window_fields(hf.sliding_window, sliding),
        default_prepend_bos=PREPENDS_BOS,
        original_config=raw,
    )


def weight_names(cfg: MoEConfig) -> dict[str, llama_like.Target]:
    return llama_like.weight_names(cfg, MOE_WEIGHTS)
