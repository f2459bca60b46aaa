"""One decode step of a transformers `DogeForCausalLM`, written by hand over the model's own weights.

transformers' forward spends most of a Doge-20M decode step outside the matmuls (mask building, cache objects,
output wrappers, ~60 small ops a layer), and recomputes `dt_proj` over every cached key at every step. This step
computes the same function for one new token per row with fewer ops: q/k/v and gate/up projections fused into one
matmul each, one RMSNorm over q and k together, RoPE with a roll, and the DMA bias `dt` of each key computed once
and cached beside K/V. Each weight shape's linears run on oneDNN's packed weights (`packed_linear.py`), in float32
or bfloat16 (`dtype`), or on MKL with dense float32 column-major weights, whichever this CPU runs faster
(`linear_choice.py`, measured when the step is built: which wins differs from one CPU to the next). Packed
modules replace the model's own, and dense ones make the model's weights views into the fused tensors, so prefill
through its forward uses them too and no weight is held twice. In bfloat16 only the packed products are: embeddings,
norms, `dt`, RoPE, the softmax, the residual stream and the KV cache stay float32.

`torch.compile` on top is `--compile` (`compiled.py`: the layers, `layers_fn`, compiled by inductor): a faster
step where per-call overhead dominates, for a start-up that compiles. `__call__` keeps the embedding, RoPE's
table, the final norm and the LM head eager either way.

It also runs the first SmallDoge layout (`convert/legacy/modeling_doge_legacy.py`: no q/k RMSNorm, `A`/`dt_proj`
per attention head), whose bias is cached per attention head and not shared across a kv group.

The DMA mask is transformers' `prepare_dynamic_mask`: a key's bias is its `dt` where the key is valid and the
dtype minimum elsewhere; when a row holds more than `keep_window_size` keys, only the top `keep_window_size`
biases (`torch.topk`) stay and the rest become the minimum. It is added to q·k/√H before the softmax.

Legend: B rows (slots), S key length, N heads, K kv heads, G = N / K, H head dim, D model dim, F ff dim, V vocab,
E_k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import compiled, linear_choice, packed_linear
from .fused import concat_bias, fuse_in_place
from .layout import dense_layout
from .quantize import Int8Linear


def _relayout(linear: nn.Module) -> None:
    if type(linear) is nn.Linear:
        linear.weight = nn.Parameter(dense_layout(linear.weight.detach()), requires_grad=False)


class _DenseFused:
    """Float32 linears run as one dense column-major matmul; the originals become row views of the fused weight
    (no copy)."""

    def __init__(self, linears: list[nn.Linear]):
        weight = dense_layout(torch.cat([m.weight.detach() for m in linears]))  # [sum O, I]
        bias = concat_bias(linears)
        rows = 0
        for m in linears:
            m.weight = nn.Parameter(weight[rows : rows + m.out_features], requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(bias[rows : rows + m.out_features], requires_grad=False)
            rows += m.out_features
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _fused_shape(linears: list[nn.Module]) -> tuple[int, int]:
    return sum(m.out_features for m in linears), linears[0].in_features


def _fuse(parent: nn.Module, names: list[str], packed, dtype: torch.dtype):
    """One matmul for `parent`'s linears `names`: oneDNN-packed in `dtype` where `packed(shape)` says so and all
    are float32 nn.Linear, int8 when all are `Int8Linear` (both through `fused.fuse_in_place`), else
    `_DenseFused`."""
    linears = [getattr(parent, n) for n in names]
    if all(packed_linear.is_packable(m) for m in linears) and packed(_fused_shape(linears)):
        return fuse_in_place(parent, names, packed_linear.PackedLinear.fused(linears, dtype))
    if all(isinstance(m, Int8Linear) for m in linears):
        return fuse_in_place(parent, names, Int8Linear.concat(linears))
    if all(type(m) is nn.Linear for m in linears):
        return _DenseFused(linears)
    raise TypeError(f"cannot fuse {[type(m).__name__ for m in linears]}: mixed linear kinds")


def _single(parent: nn.Module, name: str, packed, dtype: torch.dtype) -> None:
    linear = getattr(parent, name)
    if packed_linear.is_packable(linear) and packed((linear.out_features, linear.in_features)):
        setattr(parent, name, packed_linear.PackedLinear.of(linear, dtype))
    else:
        _relayout(linear)


def _direct(module):
    """`module`'s forward without nn.Module.__call__ (hooks, which the decode step's modules never have), or the
    callable itself when it is not a module (a `_DenseFused`)."""
    return module.forward if isinstance(module, nn.Module) else module


class _Layer:
    def __init__(self, layer: nn.Module, packed, dtype: torch.dtype):
        attn = layer.self_attn
        self.attn, self.layer = attn, layer
        n, k = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        self.qkv = _fuse(attn, ["q_proj", "k_proj", "v_proj"], packed, dtype)
        self.qk_norm_weight = None  # the first SmallDoge layout has no q/k norm
        if hasattr(attn, "q_norm"):
            self.qk_norm_weight = torch.cat([attn.q_norm.weight.detach().expand(n, -1),
                                             attn.k_norm.weight.detach().expand(k, -1)])  # [N + K, H]
            self.qk_norm_eps = attn.q_norm.variance_epsilon
        self.moe = bool(layer.config.is_moe)
        self.gate_up = _fuse(layer.mlp, ["gate_proj", "up_proj"], packed, dtype)  # CDMoE's shared expert too
        _single(attn, "o_proj", packed, dtype)
        _single(layer.mlp, "down_proj", packed, dtype)
        self.ff = layer.mlp.intermediate_size
        # What the step reads every token, bound once: an nn.Module attribute lookup and an nn.Module call each
        # cost a microsecond or two of Python, and a Doge-20M step makes a few hundred (the step is mostly such
        # overhead at batch 1, see the module docstring).
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.input_residual, self.post_residual = layer.input_residual, layer.post_attention_residual
        self.A, self.scaling = attn.A, attn.scaling
        self.dt_proj, self.o_proj = _direct(attn.dt_proj), _direct(attn.o_proj)
        self.down_proj, self.act_fn = _direct(layer.mlp.down_proj), _direct(layer.mlp.act_fn)
        self.qkv_call, self.gate_up_call = _direct(self.qkv), _direct(self.gate_up)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, D]: the dense MLP, or CDMoE routed per token."""
        gate_up = self.gate_up_call(h)  # [B, 2F]
        out = self.down_proj(self.act_fn(gate_up[:, : self.ff]) * gate_up[:, self.ff :])
        if not self.moe:
            return out
        mlp = self.layer.mlp
        # transformers views router logits as (2, B*T, keys), which pairs x/y scores of different tokens when
        # B*T > 1; for one token it is (x | y) of that token, which is what each row gets here.
        B = h.shape[0]
        scores, index = mlp.router_gate(h).view(B, 2, -1).topk(mlp.num_keys, dim=-1)  # [B, 2, keys]
        all_scores = (scores[:, 0, :, None] + scores[:, 1, None, :]).view(B, -1)  # [B, keys * keys]
        all_index = (index[:, 0, :, None] * mlp.num_keys + index[:, 1, None, :]).view(B, -1)
        top, position = all_scores.topk(mlp.top_k, dim=-1)  # [B, E_k]
        experts = all_index.gather(-1, position)
        weights = F.softmax(top, dim=-1)
        if mlp.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        down, up = mlp.down_embed(experts), mlp.up_embed(experts)  # [B, E_k, D]
        expert_weights = mlp.act_fn(torch.matmul(down, h[:, :, None])[..., 0]) * weights  # [B, E_k]
        return out + torch.matmul(expert_weights[:, None, :], up)[:, 0]


def _linear_shapes(model: nn.Module) -> dict[tuple[int, int], int]:
    """{(out, in): count} of the float32 linears a decode step runs, q/k/v and gate/up fused: what
    `linear_choice.choose` times."""
    shapes: dict[tuple[int, int], int] = {}

    def add(shape):
        shapes[shape] = shapes.get(shape, 0) + 1

    for layer in model.model.layers[: model.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
            if all(packed_linear.is_packable(m) for m in group):
                add(_fused_shape(group))
        for m in (attn.o_proj, mlp.down_proj):
            if packed_linear.is_packable(m):
                add((m.out_features, m.in_features))
    if packed_linear.is_packable(model.lm_head):
        add((model.lm_head.out_features, model.lm_head.in_features))
    return shapes


class DecodeStep:
    """`step(tokens, positions, cache, rows, keys)`: next-token logits [len(rows), V], one new token per slot."""

    def __init__(self, model: nn.Module, packed: bool | None = None, dtype: torch.dtype = torch.float32,
                 rows: tuple[int, ...] = (1,), kinds: dict[tuple[int, int], str] | None = None,
                 compile: bool = False):
        """packed: True: every float32 linear on oneDNN's packed layout in `dtype` (serve/packed_linear.py; the
        model's modules are replaced, prefill included); False: dense column-major float32 weights; None: per
        weight shape, whichever of the two runs faster here at `rows` rows (`linear_choice.py`, measured now),
        dense only where this torch lacks the packed kernels. kinds: {(out, in): "packed" | "dense"} given instead
        of measuring. dtype: the packed weights' dtype, float32 or bfloat16 (bfloat16 needs the packed kernel;
        shapes kept dense stay float32). The model is float32. compile: the layers through torch.compile
        (`compiled.py`; the first steps of each batch-size class compile them)."""
        cfg = model.config
        if model.dtype != torch.float32:
            raise ValueError(f"model dtype={model.dtype}: the static decode path takes a float32 model (its linears "
                             "are converted to `dtype` here)")
        available = packed_linear.available(dtype)
        if packed is False and dtype != torch.float32:
            raise ValueError(f"dtype={dtype} needs oneDNN's packed linear (packed=True); dense weights are float32")
        if (packed or dtype != torch.float32) and not available:
            raise ValueError(f"dtype={dtype}: this torch build has no oneDNN packed linear for it")
        shapes = _linear_shapes(model)
        self.kind_seconds: dict[tuple[int, int], dict[str, float]] = {}
        if kinds is not None:
            unknown = [k for k in kinds.values() if k not in linear_choice.KINDS]
            if unknown:
                raise ValueError(f"kinds={kinds}: {unknown} not in {linear_choice.KINDS}")
            if "packed" in kinds.values() and not available:
                raise ValueError(f"kinds asks for packed {dtype}: this torch build has no oneDNN packed linear for it")
            self.kinds = {shape: kinds.get(shape, "dense") for shape in shapes}
        elif packed is None and available:
            self.kinds, self.kind_seconds = linear_choice.choose(shapes, dtype, rows)
        else:
            self.kinds = {shape: "packed" if packed else "dense" for shape in shapes}
        self.packed = "packed" in self.kinds.values()  # some linears run packed
        self.weight_dtype = dtype
        if getattr(cfg, "sliding_window", None) is not None:
            raise ValueError(f"sliding_window={cfg.sliding_window}: the static decode path does not implement it")
        first = model.model.layers[0].self_attn
        # dt_proj gives one bias per kv head (native Doge, shared by its G query heads) or one per attention head
        # (the first SmallDoge layout, convert/legacy/modeling_doge_legacy.py).
        self.dt_heads = first.dt_proj.out_features
        if self.dt_heads not in (cfg.num_key_value_heads, cfg.num_attention_heads):
            raise ValueError(f"dt_proj.out_features={self.dt_heads}: neither num_key_value_heads="
                             f"{cfg.num_key_value_heads} nor num_attention_heads={cfg.num_attention_heads}")
        self.model = model
        self.dtype = model.dtype
        attn = model.model.layers[0].self_attn
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.groups = self.heads // self.kv_heads
        self.window = int(cfg.keep_window_size)
        is_packed = self.is_packed
        decoder = model.model.layers[: cfg.num_hidden_layers]
        weights = [compiled.float_weights(layer) for layer in decoder] if compile else None  # before re-layout
        self.layers = [_Layer(layer, is_packed, dtype) for layer in decoder]
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, signed sin [positions, H]
        head = model.lm_head
        # a packed head: a tied embedding keeps the dense tensor for its lookups
        if packed_linear.is_packable(head) and is_packed((head.out_features, head.in_features)):
            model.lm_head = packed_linear.PackedLinear.of(head, dtype)
        elif type(head) is nn.Linear:  # the tied embedding gets the same re-laid-out tensor (rows stay gatherable)
            weight = nn.Parameter(dense_layout(head.weight.detach()), requires_grad=False)
            if model.model.embed_tokens.weight is head.weight:
                model.model.embed_tokens.weight = weight
            head.weight = weight
        self.compiled_layers = compiled.compile_layers(self, weights) if compile else None

    def is_packed(self, shape: tuple[int, int]) -> bool:
        return self.kinds.get(shape) == "packed"

    def fused_layers(self, kind: type) -> list:
        """The fused q/k/v and gate/up layers of class `kind` (they are not submodules of the model)."""
        return [f for lay in self.layers for f in (lay.qkv, lay.gate_up) if isinstance(f, kind)]

    def float_weight_bytes(self) -> int:
        """Bytes of the float32 and bfloat16 weights a step reads every token: all but the int8 layers, and but
        the embedding table (read a row a token). The int8 kernels' timing reads as much between samples beside
        their own bytes (`kernel_choice.choose`'s `other_bytes`)."""
        def nbytes(m) -> int:
            if isinstance(m, Int8Linear):
                return 0
            if isinstance(m, packed_linear.PackedLinear):
                return m.nbytes
            return sum(t.nbytes for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if t is not None)

        total = nbytes(self.model.lm_head)
        for lay in self.layers:
            mlp = lay.layer.mlp
            total += sum(nbytes(m) for m in (lay.qkv, lay.gate_up, lay.attn.o_proj, lay.attn.dt_proj, mlp.down_proj))
            if lay.moe:
                total += nbytes(mlp.router_gate)
        return total

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # Rope types whose frequencies below the original context are the module's initial ones ("dynamic" NTK resets
    # to them there; "default" and "linear" never change).
    TABLE_ROPE_TYPES = ("default", "linear", "dynamic")

    def rope(self, x: torch.Tensor, positions: torch.Tensor, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, H] of the model's rotary module at `positions`, the first half of sin negated
        (rotate_half(q) * sin == roll(q, H/2) * that sin).

        Positions below the module's original context come from a table of the module's own output, built on the
        first step (an outer product and cos/sin, elementwise, so each entry is bitwise what a call for that
        position returns; tested): the module's forward, with transformers' dynamic-NTK bookkeeping around it,
        took ~6 % of a Doge-20M step. Rows reaching past it (`keys`, the longest row's length, at or beyond
        the original context) and other rope types call the module, as transformers does."""
        rotary = self.model.model.rotary_emb
        limit = getattr(rotary, "original_max_seq_len", 0)
        if keys < limit and getattr(rotary, "rope_type", None) in self.TABLE_ROPE_TYPES:
            if self._rope_table is None or self._rope_table[0].dtype != x.dtype:
                cos, sin = rotary(x[:1], torch.arange(limit - 1)[None])  # [1, limit - 1, H]: seq_len below limit
                self._rope_table = cos[0], self._signed(sin[0])
            cos, sin = self._rope_table
            return cos[positions][:, None], sin[positions][:, None]
        cos, sin = rotary(x, positions[:, None])
        return cos, self._signed(sin)

    def _signed(self, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    def dt(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """DMA bias of keys from their values [..., K, S, H] -> [..., K, S] (transformers' formula)."""
        attn = self.layers[layer].attn
        v = values.transpose(-2, -3).flatten(-2)  # [..., S, K*H]
        return torch.exp(attn.A * F.softplus(attn.dt_proj(v))).transpose(-1, -2)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, rows: torch.Tensor,
                 keys: int) -> torch.Tensor:
        """tokens [B], positions [B] (the cache column each new token goes to), rows: the slots to return,
        keys: max(positions) + 1, the key columns read (a Python int, so a traced graph has no data-dependent
        shape)."""
        x = self.model.model.embed_tokens(tokens)  # [B, D]
        cos, sin = self.rope(x, positions, keys)  # [B, 1, H]; sin with its first half negated (see `rope`)
        # The compiled layers (compiled.py) cover rows within the DMA window; past it, the top-k runs eagerly.
        layers = self.compiled_layers if self.compiled_layers is not None and keys <= self.window else self.layers_fn
        x = layers(x, cos, sin, positions, cache.keys, cache.values, cache.dts, keys)
        norm = self.model.model.norm
        x = F.rms_norm(x[rows], (x.shape[-1],), norm.weight, norm.variance_epsilon)
        return self.model.lm_head(x).float()  # [rows, V]

    def layers_fn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], dt_caches: list[torch.Tensor],
                  keys: int, layers: list[_Layer] | None = None) -> torch.Tensor:
        """The decoder layers on the new tokens' embeddings x [B, D]: writes each layer's key, value and `dt` at
        `positions`, attends over the first `keys` columns, returns the last hidden state [B, D]. layers: the
        step's own by default; `compiled.py` passes copies whose linears it compiles."""
        B, S = x.shape[0], keys
        N, K, G, H = self.heads, self.kv_heads, self.groups, self.head_dim
        minimum = torch.finfo(self.dtype).min
        slot = torch.arange(B)
        top_k = S > self.window  # the longest row holds S keys
        D = x.shape[-1]
        for i, lay in enumerate(self.layers if layers is None else layers):
            residual = x
            h = F.rms_norm(x, (D,), *lay.input_norm)
            qkv = lay.qkv_call(h)  # [B, (N + 2K) H]
            qk = qkv[:, : (N + K) * H].view(B, N + K, H)
            if lay.qk_norm_weight is not None:
                qk = F.rms_norm(qk, (H,), None, lay.qk_norm_eps) * lay.qk_norm_weight
            qk = torch.addcmul(qk * cos, qk.roll(H // 2, dims=-1), sin)  # RoPE, [B, N + K, H]
            v = qkv[:, (N + K) * H :].view(B, K, H)
            k_cache, v_cache, dt_cache = k_caches[i], v_caches[i], dt_caches[i]  # [slots, K, cap(, H)]
            k_cache[slot, :, positions] = qk[:, N:]
            v_cache[slot, :, positions] = v
            dt_cache[slot, :, positions] = torch.exp(lay.A * F.softplus(lay.dt_proj(v.reshape(B, K * H))))
            bias = dt_cache[:B, :, :S]  # [B, K or N, S]: the minimum past each row's keys (static_cache.py)
            if top_k:
                kept = torch.topk(bias, self.window, dim=-1, largest=True, sorted=False).indices
                bias = bias.masked_fill(~torch.zeros_like(bias, dtype=torch.bool).scatter_(-1, kept, True), minimum)
            q = qk[:, :N].view(B, K, G, H)  # each kv head's G query heads act as G query rows
            # query head n = k * G + g reads kv head k (transformers' repeat_kv), so a per-head bias is [B, K, G, S]
            mask = bias[:, :, None, :] if bias.shape[1] == K else bias.view(B, K, G, S)
            out = F.scaled_dot_product_attention(q, k_cache[:B, :, :S], v_cache[:B, :, :S],
                                                 attn_mask=mask, scale=lay.scaling)  # [B, K, G, H]
            # transformers: input_residual * residual + attention output (addcmul: the same product and sum)
            x = torch.addcmul(lay.o_proj(out.reshape(B, N * H)), lay.input_residual, residual)
            x = torch.addcmul(lay.mlp(F.rms_norm(x, (D,), *lay.post_norm)), lay.post_residual, x)
        return x
