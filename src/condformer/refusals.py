"""Every combination condformer refuses on purpose, with its one-line reason: the single table.

Everything else composes (every block x router x FFN x residual stream x depth policy; tested in
tests/test_composition.py). A refusal is raised where the knowledge to detect it lives (a component's
option check, a decoder that meets a non-causal layer), but its name and reason are here, so the list of
what does not combine is read in one place and a new refusal has to be added to this table (and to the
test that makes each one fire). ``{where}`` in a reason is the refusing layer or section.
"""

from __future__ import annotations

from condformer.errors import ConfigError

REFUSED: dict[str, str] = {
    # decoders must never see later tokens (in evaluation and generation)
    "moe_noncausal_in_decoder": (
        "{where}: {what} is not causal (a token's experts depend on later tokens), so it leaks the future in a "
        "decoder; use it in an encoder, or set allow_noncausal: true (no KV-cached generation)"),
    "moe_eval_capacity_in_decoder": (
        "{where}: eval_capacity_factor drops tokens by a priority over the whole batch, so in a decoder a token's "
        "output depends on later tokens; leave it null (dropless evaluation, the default), or set allow_noncausal: "
        "true (no KV-cached generation)"),
    "moe_noncausal_cached": (
        "{where}: {what} is not causal and cannot decode with a KV cache; use a token-choice router (topk, switch, "
        "hash, ...) with dropless evaluation (eval_capacity_factor null)"),
    "mod_topk_cached": (
        "{where} routes by top-k, which is not causal and cannot decode with a KV cache; use eval mode with "
        "eval_routing='causal' and a causal_router ('predictor' or 'aux')"),
    "mod_causal_without_router": (
        "{where}: eval_routing 'causal' needs a causal_router ('predictor' or 'aux'); set one, or "
        "eval_routing='topk' (not causal: no generation)"),
    "mod_ffn_block": (
        "{where}: MoD routed 'ffn' needs a block whose FFN adds its own update to the residual stream (preln or "
        "parallel), not '{block}'; use routed 'block' (the whole block) with this block type"),
    # early exit is a generation technique
    "exits_in_encoder": "exits need a decoder (kind: decoder); early exit is a generation technique",
    "halting_with_mixed_training": (
        "a halting module needs exits.training 'aligned': its oracle compares every exit's likelihood of each "
        "token, which mixed training does not compute"),
    "thresholds_with_halting": (
        "exits.thresholds are for confidence exits; with exits.halting set, the halting module decides the depth: "
        "set thresholds to null or halting to 'none'"),
    "moe_mlp_bias": (
        "{where}: MoE experts have no biases; set mlp_bias false (a biased dense FFN converts to experts only "
        "without its biases, which would change the model)"),
    # widths that cannot meet
    "shaped_attention_heads": (
        "{where}: a {block} block's shaped attention uses its input as the values (W_V = I), so it needs one "
        "key/value head per query head and n_heads * head_dim = d_model, with no q/k norm or biases; got {what}: "
        "use block 'preln' or 'parallel' for such attention"),
    "altup_concat_recycled": (
        "altup.output 'concat' needs variant 'standard' (a recycled embedding is d wide); use output 'mean' or "
        "'sum'"),
    "altup_tied_narrow_head": (
        "altup.output '{output}' gives a d-wide head that cannot be tied to the K*d-wide standard embedding; set "
        "tie_embeddings=false or use output 'concat'"),
}


def refuse(key: str, **details: object) -> ConfigError:
    """The one-line error of refusal ``key`` (raise it: ``raise refuse("exits_in_encoder")``)."""
    return ConfigError(REFUSED[key].format(**details))
