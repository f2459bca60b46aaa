"""What both kernels' entry points compute around their Pallas calls, in plain XLA: the per-row top-k thresholds
(and the GPU kernel's sparse walk plan), and the reference's output for rows with no allowed key."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from doge_jax.kernels import topk as _topk
from doge_jax.model.mask import MaskSpec


def uniform_rows(q, k, v, scale):
    """[B, T, N, H]: the reference's output for a row whose every key is masked, and its derivative.

    Value: the mean of v over all S keys. Derivative: the softmax Jacobian at the uniform distribution, which
    the reference applies to the raw scores q·k·scale, i.e. (scale/S)·Σ_s (dq·k_s + q·dk_s)(v_s − v̄). Written as
    zero-valued terms (x − stop_gradient(x)) so that no [T, S] array is formed: O(S·H²) per kv head.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    sg = jax.lax.stop_gradient
    f32 = jnp.float32
    v32, k32 = v.astype(f32), k.astype(f32)
    v_mean = jnp.mean(v32, axis=1)  # [B, K, H]
    v_centered = sg(v32 - v_mean[:, None])  # [B, S, K, H]
    kv_moment = jnp.einsum("BSKH,BSKJ->BKHJ", sg(k32), v_centered)
    kv_moment_dk = jnp.einsum("BSKH,BSKJ->BKHJ", k32 - sg(k32), v_centered)  # 0, carries dk
    qg = q.reshape(b, t, kh, n // kh, h).astype(f32)  # [B, T, K, R, H]
    jac = (jnp.einsum("BTKRH,BKHJ->BTKRJ", qg - sg(qg), kv_moment)
           + jnp.einsum("BTKRH,BKHJ->BTKRJ", sg(qg), kv_moment_dk))  # 0, carries dq and dk
    out = v_mean[:, None, :, None, :] + jac * (scale / s)
    return out.reshape(b, t, n, h)


def topk_setup(dt, dt_w, valid, mask: MaskSpec, *, t, t_pad, block_q, block_k, sparse, chunk):
    """Thresholds [B, K, Gr, T_p] (None when the top-k keeps every allowed key) and the sparse plan (or None)."""
    b, s = dt.shape[0], dt.shape[2]
    w, offset, sliding_window = mask.keep_window_size, mask.static_offset, mask.sliding_window
    kh, bias_rows, s_pad = dt_w.shape[1], dt_w.shape[2], dt_w.shape[3]
    if s <= w or (sliding_window is not None and sliding_window <= w):
        return None, None, chunk  # no row can see more than w keys
    if mask.q_segment_ids is not None or sliding_window is not None:
        thr = _topk.general_thresholds(jax.lax.stop_gradient(dt.astype(jnp.float32)), t, mask)
        thr = jnp.pad(thr, ((0, 0), (0, 0), (0, t_pad - t)), constant_values=-jnp.inf)
        return thr.reshape(b, kh, bias_rows, t_pad), None, chunk
    dtm = jax.lax.stop_gradient(jnp.where(valid[:, None, None, :], dt_w, -jnp.inf))
    thrpos = _topk.prefix_thresholds(dtm, w)  # [B, K, Gr, S_p]
    thr = jnp.take(thrpos, jnp.clip(offset + jnp.arange(t_pad), 0, s_pad - 1), axis=-1)
    if not (sparse if sparse is not None else s_pad >= 2 * w):
        return thr, None, chunk
    chunk = chunk or _topk.default_chunk(s_pad, block_k)
    plan = _topk.sparse_plan(thrpos, dtm, q_offset=offset, n_q_tiles=t_pad // block_q, block_q=block_q,
                             block_k=block_k, chunk=chunk)
    return thr, plan, chunk


def check_layout(kernel: str, q: jax.Array, k: jax.Array, v: jax.Array, dt: jax.Array) -> None:
    """One-line ValueError unless q [B, T, N, H], k/v [B, S, K, H] (N a multiple of K), dt [B, G, S] (G = K or N)."""
    b, _, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = dt.shape[1]
    if n % kh or g not in (kh, n) or k.shape != v.shape or dt.shape != (b, g, s) or k.shape[0] != b \
            or k.shape[3] != h:
        raise ValueError(f"{kernel}: q {q.shape}, k {k.shape}, v {v.shape}, dt {dt.shape}: expected q [B,T,N,H], "
                         "k/v [B,S,K,H] with N a multiple of K, dt [B,G,S] with G = K or N")
