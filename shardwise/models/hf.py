"""Hugging Face interop: config.json + safetensors <-> shardwise ModelConfig + state dict, for `llama`,
`mixtral`, `qwen2_moe`, `deepseek_v2` and `deepseek_v3`.

The configs are mapped in `hf_configs`, the tensors in `hf_tensors`; `hf_io` reads and writes local
directories (never the hub), `hf_init` reads one tensor slice at a time into a sharded model. This module
re-exports the public names.

Conventions that differ between the two codebases are converted exactly (index copies and transposes, so
import -> export is bitwise):
  * RoPE: HF Llama/Mixtral/Qwen rotate the two halves of head_dim (rotate_half: dim i pairs with i + D/2);
    shardwise rotates interleaved pairs (2i, 2i+1), like Meta's original Llama. Both use frequency i for
    pair i, so q/k rows (and the q/k biases) are permuted per head: ours[2i] = hf[i], ours[2i+1] = hf[i + D/2].
    Attention scores are dot products, invariant under the same permutation of q and k; v and o are
    untouched. DeepSeek's latent attention rotates interleaved pairs already (V2 by complex multiplication,
    V3 with `rope_interleave: true`), so its rows are copied as they are; a V3 file with
    `rope_interleave: false` gets the rotated part of each q head and the shared rotated key permuted.
  * Experts: HF stores per-expert nn.Linear weights ([out, in]: Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`,
    Qwen2-MoE / DeepSeek `mlp.experts.{e}.gate_proj/up_proj/down_proj`, what transformers 5 still writes to
    disk), or in memory in transformers 5.x (and files saved from it) fused `mlp.experts.gate_up_proj`
    [E, 2F, d] (gate rows first) and `down_proj` [E, d, F]. shardwise GroupedExperts holds w1/w3 [E, d, F]
    and w2 [E, F, d] (x @ w), the transposes. Import reads either layout; export writes the per-expert one.

Routers: Mixtral = softmax top-k renormalised (norm_topk_prob=True); Qwen2-MoE = softmax top-k, renormalised
when `norm_topk_prob`, shared expert `mlp.shared_expert` gated by sigmoid(`mlp.shared_expert_gate` x);
DeepSeek-V2 = softmax top-k (optionally group-limited with the group's best score: `topk_method:
group_limited_greedy`) times `routed_scaling_factor`, never renormalised in transformers; DeepSeek-V3 =
sigmoid scores + `e_score_correction_bias` (shardwise's balancing bias buffer) for the selection, groups
scored by their two best, renormalised, times `routed_scaling_factor`. All dropless (capacity_factor null).
DeepSeek-V3's multi-token-prediction layers are DeepSeek's own layout, layer num_hidden_layers + k
(`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, a decoder layer, and copies of the embedding and head);
transformers skips them when loading, and does not write them.

`router_aux_loss_coef` maps to moe.aux_loss_coef as a nominal value only: transformers pools the Switch loss
over all layers (value top_k when balanced), shardwise sums per-layer losses (1 per layer when balanced), so
continued training with the same coefficient weighs balancing differently (L/top_k times). Logits do not
depend on it.
"""
from __future__ import annotations

from .hf_configs import (ARCHITECTURES, SUPPORTED, HFConversionError, config_from_hf, config_to_hf, hf_config_object,
                         hf_model_type, read_hf_config)
from .hf_tensors import (HFFormat, export_format, expected_hf_shapes, format_of, state_dict_from_hf, state_dict_to_hf,
                         tensor_specs)

__all__ = ["ARCHITECTURES", "SUPPORTED", "HFConversionError", "HFFormat", "config_from_hf", "config_to_hf",
           "expected_hf_shapes", "export_format", "format_of", "hf_config_object", "hf_model_type", "read_hf_config",
           "state_dict_from_hf", "state_dict_to_hf", "tensor_specs"]
