"""Attention dropout drawn with textclf's fast CPU mask, for encoders trained on CPU.

BERT-family encoders (MiniLM included) drop attention probabilities, a batch x heads x length x length tensor that
no dropout module holds: transformers' SDPA attention draws that mask inside torch's kernel, one Mersenne-Twister
number per element, and it grows with the square of the length. With the mask of
:func:`textclf.components.dropout.fast_dropout` a MiniLM-L6 training step in bf16 is 9-24% faster at 48-256 tokens
(0-7% in fp32; ``scripts/bench_attention_dropout.py``, docs/benchmarks.md). transformers lets a model take an
attention function registered by name (``AttentionInterface``); the one here is SDPA's except while dropping.
"""

from __future__ import annotations

import torch
from torch import nn

from textclf.components.dropout import fast_dropout

# The name under which transformers finds the attention function below (and the mask format it takes: SDPA's).
FAST_DROPOUT_ATTENTION = "sdpa_fast_cpu_dropout"
# Model types whose attention hands the function nothing but queries, keys, values, a mask, the dropout and the
# scaling (no relative position bias, soft-capping or attention sinks, which the hand-written path leaves out).
SWITCHED_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})
# Arguments that only transformers' own SDPA path applies: given one, the function hands the call over to it.
_SDPA_ONLY = ("position_bias", "softcap", "s_aux", "sinks")


def sdpa_with_fast_dropout(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention, except with attention dropout (models pass it while training only): then the
    eager computation (scores, mask, softmax, dropout, weighted values) with the fast mask on the probabilities.

    Takes SDPA's masks: boolean (True attends) or additive, or None for "attend to everything" (or causal)."""
    # Imported here: transformers' integrations load only once a model needs them.
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not dropout or any(kwargs.get(name) is not None for name in _SDPA_ONLY):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)  # SDPA's default
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # The probabilities stay in the softmax's float32 under bf16 autocast: a bf16 mask would round 1 / (1 - p).
    probabilities = fast_dropout(nn.functional.softmax(scores, dim=-1), dropout)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


def use_fast_cpu_attention_dropout(base_model: nn.Module) -> bool:
    """Switch a BERT-family encoder that runs SDPA attention with attention dropout to
    :func:`sdpa_with_fast_dropout`; returns whether it switched. Other models keep their attention (the Llama family
    has no attention dropout). The choice lives in the config in memory only: transformers does not save it, so a
    saved model loads anywhere with its usual attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = base_model.config
    if (config.model_type not in SWITCHED_MODEL_TYPES or not getattr(config, "attention_probs_dropout_prob", 0)
            or config._attn_implementation != "sdpa"):
        return False
    AttentionInterface.register(FAST_DROPOUT_ATTENTION, sdpa_with_fast_dropout)
    AttentionMaskInterface.register(FAST_DROPOUT_ATTENTION, sdpa_mask)
    base_model.set_attn_implementation(FAST_DROPOUT_ATTENTION)  # only warns where a model cannot take it
    return config._attn_implementation == FAST_DROPOUT_ATTENTION
