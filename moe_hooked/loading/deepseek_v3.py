"""DeepSeek-V3 / R1 and the models built like them (`model_type` "deepseek_v3", e.g. Moonlight-16B-A3B).

The attention, layer kinds and shared experts are DeepSeek-V2's (see `deepseek_v2`); rotary
pairs are interleaved when `rope_interleave` (the default) says so. The router, as
transformers' `DeepseekV3TopkRouter` computes it (whatever `topk_method` / `scoring_func`
the config names):

- scores = sigmoid(x W_r^T), in float32;
- the experts are chosen with scores + `e_score_correction_bias` (a per-expert bias, loaded
  into `Router.selection_bias`): the `topk_group` of `n_group` groups whose two best biased
  scores sum highest are eligible, and the top `num_experts_per_tok` eligible biased scores
  win;
- the weights are the chosen experts' unbiased scores, divided by their sum (+ 1e-20) when
  `norm_topk_prob`, times `routed_scaling_factor`.

Multi-token-prediction layers (`num_nextn_predict_layers`) are not part of the model.
"""

from __future__ import annotations

from transformers import DeepseekV3Config

from moe_hooked.config import MoEConfig
from moe_hooked.loading import deepseek_v2, llama_like
from moe_hooked.loading.deepseek import NORM_TOPK_EPS
from moe_hooked.loading.llama_like import Target

MODEL_TYPE = "deepseek_v3"


def config_from_hf(raw: dict) -> MoEConfig:
    hf = DeepseekV3Config.from_dict(raw)
    return MoEConfig(
        architecture=MODEL_TYPE,
        **deepseek_v2.mla_fields(hf, raw),
        router_scoring="sigmoid",
        router_selection_bias=True,
        n_expert_groups=hf.n_group,
        topk_groups=hf.topk_group,
        group_score="top2_sum",
        norm_topk_prob=bool(hf.norm_topk_prob),
        norm_topk_eps=NORM_TOPK_EPS,
        rope_interleaved=bool(hf.rope_interleave),
    )


MOE_WEIGHTS = deepseek_v2.MOE_WEIGHTS | {"mlp.gate.e_score_correction_bias": Target("mlp.router.selection_bias")}
"""V2's MoE weights plus the router's selection bias."""


def weight_names(cfg: MoEConfig) -> dict[str, Target]:
    return llama_like.weight_names(cfg, MOE_WEIGHTS, attention_names=deepseek_v2.mla_attention_names)
