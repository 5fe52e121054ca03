"""Mixture-of-Experts: the FFN (:mod:`.ffn`), its routers (:mod:`.routers`), dispatch to experts
(:mod:`.dispatch`), the experts' weights (:mod:`.experts`) and the balancing losses (:mod:`.losses`).

Importing this package registers the ``moe`` FFN; ``condformer.routing.moe.MoE`` is its typed options.
"""

from condformer.routing.moe.ffn import (
    DISPATCHES,
    GRANULARITIES,
    LEARNED_TOKEN_CHOICE,
    ROUTER_KINDS,
    TOP1_KINDS,
    MoE,
    MoEFFN,
    expert_width,
    is_causal_routing,
    top_k_of,
)

__all__ = ["DISPATCHES", "GRANULARITIES", "LEARNED_TOKEN_CHOICE", "ROUTER_KINDS", "TOP1_KINDS", "MoE", "MoEFFN",
           "expert_width", "is_causal_routing", "top_k_of"]
