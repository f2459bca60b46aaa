"""The Doge model, in the order it reads bottom-up:

    options.py         the implementation tables behind the config's named choices
    config.py          DogeConfig: every field with its default, allowed values and transformers name
    layers.py          Dense, RMSNorm, the gated MLP (and BlockOutput, what every feed-forward block returns)
    rope.py            rotary embeddings (default, linear, dynamic NTK)
    mask.py            MaskSpec: which keys each query may see, and the top-k window
    dma_reference.py   Dynamic Mask Attention in plain jnp: the reference every kernel is tested against
    moe_reference.py   CDMoE routing, experts, and the routing losses/statistics in plain jnp
    attention_impl.py  the one place that chooses the attention implementation (reference or a kernel)
    attention.py       the DMA layer: projections, q/k norm, RoPE, the dt bias, the KV cache
    moe.py             the CDMoE block: parameters, and the choice between the reference and expert-parallel
    decoder.py         the decoder layer and the causal LM (Doge, build, count_params)
    loss.py            next-token cross-entropy

This package's __init__ imports nothing, so the kernels (`doge_jax.kernels`) and the expert-parallel code
(`doge_jax.parallel`) can import the references without running the dispatchers that import them.
"""
