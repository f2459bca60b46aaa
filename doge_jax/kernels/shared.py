"""What both kernels' entry points compute around their Pallas calls, in plain XLA: the per-row top-k thresholds
(and the GPU kernel's sparse walk plan), the reference's output for rows with no allowed key, and the key
permutation of a sparse walk (`permute_keys`: the TPU entry uses it; gpu_dma keeps its own copy, `_permute`)."""

from __future__ import annotations

import functools

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from doge_jax.kernels import topk as _topk
from doge_jax.model.mask import MaskSpec
from doge_jax.model.options import ATTENTION_LSE, ATTENTION_OUT


def with_kernel_backward(forward, backward, cfg, q, k, v, dt, meta):
    """(o, lse) of a DMA kernel, differentiable in q, k, v and dt; both kernels (GPU, TPU) are wired this way.

    forward(cfg, q, k, v, dt, meta) → (o, lse): the forward kernel as a jit call; backward(cfg, q, k, v, dt, meta,
    o, lse, do) → (dq, dk, dv, ddt): the backward kernels. The forward runs outside any custom_vjp, its outputs
    named for remat policies (`remat_policy="attention"` saves ATTENTION_OUT and ATTENTION_LSE), and `_attach`
    hands them to the backward as inputs. So under that remat the forward kernel runs once per layer: a
    custom_vjp whose own forward rule ran the kernel runs it twice (once for the primal, once for the residuals),
    and a remat recompute nobody reads is dropped only as a jit call (jax keeps a bare pallas_call)."""
    o, lse = forward(cfg, *jax.lax.stop_gradient((q, k, v, dt, meta)))
    o, lse = checkpoint_name(o, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)
    return _attach(cfg, backward, q, k, v, dt, meta, o, lse), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attach(cfg, backward, q, k, v, dt, meta, o, lse):
    """o, differentiable in q, k, v and dt by `backward` (o and lse: the forward's, not differentiated)."""
    return o


def _attach_fwd(cfg, backward, q, k, v, dt, meta, o, lse):
    return o, (q, k, v, dt, meta, o, lse)


def _attach_bwd(cfg, backward, res, do):
    dq, dk, dv, ddt = backward(cfg, *res, do)
    return dq, dk, dv, ddt.astype(res[3].dtype), None, None, None


_attach.defvjp(_attach_fwd, _attach_bwd)


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


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """perm [B, K, S] → its inverse, by a scatter (a second argsort costs XLA:TPU seconds of compile at 16k keys)."""
    b, kh, s = perm.shape
    slots = jnp.broadcast_to(jnp.arange(s, dtype=perm.dtype), perm.shape)
    return jnp.zeros_like(perm).at[jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None], perm].set(slots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute_keys(x, perm, inverse, axis):
    """x gathered along `axis` (2 or 3) by perm [B, K, S]; its transpose is the gather by `inverse` (no scatter-add)."""
    return _take_keys(x, perm, axis)


def _take_keys(x, idx, axis):
    idx = jnp.expand_dims(idx, tuple(range(3, x.ndim))) if axis == 2 else idx[:, :, None, :]
    return jnp.take_along_axis(x, idx, axis=axis)


def _permute_keys_fwd(x, perm, inverse, axis):
    return _take_keys(x, perm, axis), inverse


def _permute_keys_bwd(axis, inverse, g):
    return _take_keys(g, inverse, axis), None, None


permute_keys.defvjp(_permute_keys_fwd, _permute_keys_bwd)
