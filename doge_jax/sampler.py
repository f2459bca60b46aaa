"""Batched autoregressive sampling with a KV cache: one prefill, then a jit-compiled decode loop.

    sampler = Sampler(model, pad_id=tok.pad_token_id)
    out = sampler([[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.9,
                                                      stop_tokens=(2,)), seed=0)
    out.tokens[b, :out.lengths[b]]   # the completion of prompt b (its stop token included, as transformers)

Prompts are left-padded to a common length P so every row writes its next key at the same cache slot. Positions
follow transformers' `generate` for left padding: `cumsum(mask) − 1` over the prompt (padding at 0), then one
more per generated token, so a padded row sees exactly the positions it would see alone. The cache grows in
doubling chunks up to P + max_new_tokens slots (`cache_schedule`); the attention mask marks the filled,
non-padding slots. Greedy decoding (temperature 0)
is token-identical to `DogeForCausalLM.generate(do_sample=False)` on the same weights (tests/test_sampler.py).

Prompt and cache lengths are rounded up to `bucket` so a handful of programs serve every request size; padding
never changes the result (padding keys are masked and positions ignore it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from doge_jax.model import decoder as model_lib

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


@dataclasses.dataclass
class SampleOutput:
    """Per prompt b: tokens[b, :lengths[b]] is the completion (stop token included); the rest is padding.

    logprobs[b, i] = log p(tokens[b, i]) under the model's untempered distribution (0 past the end)."""

    tokens: np.ndarray  # [B, max_new_tokens] int32
    lengths: np.ndarray  # [B] int32
    logprobs: np.ndarray  # [B, max_new_tokens] float32
    stopped: np.ndarray  # [B] bool: ended on a stop token (else ran out of max_new_tokens)

    def completions(self) -> list[list[int]]:
        return [self.tokens[b, :n].tolist() for b, n in enumerate(self.lengths)]


# --- token selection ----------------------------------------------------------------------------------------------

def filter_logits(logits: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits [B, V] → tempered logits with filtered-out tokens at −inf (transformers' order: T, top-k, top-p)."""
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p (always >= 1 token).
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1  # [B, 1]
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


def select_tokens(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int,
                  top_p: float) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 → (tokens [B] int32, their log-probs under the untempered distribution [B])."""
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


# --- the jitted program -------------------------------------------------------------------------------------------

def cache_schedule(prompt_len: int, cache_len: int, first: int = 64) -> list[int]:
    """The cache lengths decoding moves through: prompt + 64, + 128, + 256, … then cache_len.

    Each decode step reads every slot of the cache, filled or not, so a cache that grows in doubling chunks
    reads at most twice the filled length (a fixed full-size cache reads all of it from the first token on)."""
    lengths, n = [], first
    while prompt_len + n < cache_len:
        lengths.append(prompt_len + n)
        n *= 2
    return lengths + [cache_len]


def _grow(cache: list, kv_mask: jax.Array, length: int) -> tuple[list, jax.Array]:
    """Pads every layer's k/v [B, S, K, H], dt [B, G, S] and the slot mask [B, S] with empty slots to `length`."""
    extra = length - kv_mask.shape[1]
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])  # noqa: E731
    cache = [{"k": pad(c["k"], 1), "v": pad(c["v"], 1), "dt": pad(c["dt"], 2)} for c in cache]
    return cache, pad(kv_mask, 1)


def sample(model: model_lib.Doge, prompt_ids: jax.Array, prompt_mask: jax.Array, stop_tokens: jax.Array,
           rng: jax.Array, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           cache_len: int | None = None, grow_cache: bool = True) -> tuple[jax.Array, ...]:
    """The traceable core (jit it, or call it inside a jitted train step as GRPO does).

    prompt_ids / prompt_mask [B, P] left-padded (mask 1 = token); stop_tokens [n] int32 (−1 entries match
    nothing). Returns tokens [B, M] (0 past the end), logprobs [B, M], lengths [B], stopped [B], M = max_new_tokens.
    With grow_cache the decode loop runs once per length of `cache_schedule` (more to compile, less to read).
    """
    B, P = prompt_ids.shape
    M = max_new_tokens
    cache_len = P + M if cache_len is None else cache_len
    if cache_len < P + M:
        raise ValueError(f"{cache_len=} must be >= prompt length {P} + max_new_tokens {M}")
    select = functools.partial(select_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    lengths_schedule = cache_schedule(P, cache_len) if grow_cache else [cache_len]

    prompt_mask = prompt_mask.astype(jnp.int32)
    positions = jnp.where(prompt_mask > 0, jnp.cumsum(prompt_mask, axis=-1) - 1, 0)  # [B, P], as transformers
    S0 = lengths_schedule[0]
    kv_mask = jnp.zeros((B, S0), jnp.int32).at[:, :P].set(prompt_mask)  # [B, S]
    out = model(prompt_ids, kv_mask, positions=positions, cache=model.init_cache(B, S0), cache_index=0)
    rng, key = jax.random.split(rng)
    first, first_lp = select(out.logits[:, -1], key)

    tokens = jnp.zeros((B, M), jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((B, M), jnp.float32).at[:, 0].set(first_lp)
    done = jnp.isin(first, stop_tokens)
    lengths = jnp.ones((B,), jnp.int32)
    next_pos = positions[:, -1] + 1  # [B]

    def body(carry):
        i, cache, kv_mask, tokens, logprobs, done, lengths, next_pos, rng = carry
        slot = P + i - 1  # where token i−1 (the one we feed) lands in the cache
        kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((B, 1), jnp.int32), (0, slot))
        prev = jax.lax.dynamic_slice(tokens, (0, i - 1), (B, 1))  # [B, 1]
        out = model(prev, kv_mask, positions=next_pos[:, None], cache=cache, cache_index=slot)
        rng, key = jax.random.split(rng)
        tok, lp = select(out.logits[:, -1], key)
        tok = jnp.where(done, 0, tok)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stop_tokens)
        return i + 1, out.cache, kv_mask, tokens, logprobs, done, lengths, next_pos + 1, rng

    carry = (jnp.int32(1), out.cache, kv_mask, tokens, logprobs, done, lengths, next_pos, rng)
    for S in lengths_schedule:
        if S != carry[2].shape[1]:
            cache, kv_mask = _grow(carry[1], carry[2], S)
            carry = (carry[0], cache, kv_mask, *carry[3:])
        last = min(M, S - P + 1)  # token i is fed at slot P + i − 1 < S

        def cond(carry, last=last):
            i, _, _, _, _, done, *_ = carry
            return (i < last) & ~jnp.all(done)

        carry = jax.lax.while_loop(cond, body, carry)
    _, _, _, tokens, logprobs, done, lengths, _, _ = carry
    return tokens, logprobs, lengths, done


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                              "cache_len"))
def _generate(graphdef, state, prompt_ids, prompt_mask, stop_tokens, rng, **static):
    model = nnx.merge(graphdef, state)
    model.eval()  # dropout off on this traced copy; the caller's module keeps its mode
    return sample(model, prompt_ids, prompt_mask, stop_tokens, rng, **static)


def stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
    """Stop ids padded with −1 (matches nothing) to a multiple of 8, so a new stop list rarely recompiles."""
    stops = np.full((max(8, _round_up(len(stop_tokens), 8)),), -1, np.int32)
    stops[:len(stop_tokens)] = stop_tokens
    return stops


def cast_model(model: model_lib.Doge, dtype: str) -> model_lib.Doge:
    """A copy of `model` computing in `dtype` with its floating-point weights stored in `dtype`."""
    from doge_jax import checkpoint as ckpt

    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          ckpt.params_of(model))
    return ckpt.with_params(model_lib.abstract_model(model.cfg.replace(dtype=dtype)), params)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (ids [B, P], mask [B, P]) left-padded to `length` (default: the longest prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"{length=} is shorter than the longest prompt ({longest} tokens)")
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for b, p in enumerate(prompts):
        ids[b, length - len(p):] = p
        mask[b, length - len(p):] = 1
    return ids, mask


class Sampler:
    """Samples completions from a Doge model (see the module docstring). `update(model)` swaps in new weights of
    the same architecture without recompiling.

    `dtype` (e.g. "bfloat16") decodes with a copy of the weights and activations in that dtype: half the memory
    and, on accelerators, faster decoding. The default keeps the model's own dtype (float32: the path that is
    token-identical to transformers). On the 2-core AMD CPU of our benchmarks XLA's bfloat16 decode was slower
    than float32 (1.75 vs 1.38 ms per Doge-20M token), so CPU users should leave it unset."""

    def __init__(self, model: model_lib.Doge, *, pad_id: int = 0, bucket: int = 64, dtype: str | None = None):
        if bucket < 1:
            raise ValueError(f"bucket={bucket} must be >= 1")
        if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r} must be one of ['float32', 'bfloat16', 'float16'] or None")
        self.pad_id = int(pad_id)
        self.bucket = bucket
        self.dtype = dtype
        self.update(model)

    def update(self, model: model_lib.Doge) -> None:
        if self.dtype is not None and self.dtype != model.cfg.dtype:
            model = cast_model(model, self.dtype)
        self.graphdef, self.state = nnx.split(model)

    def __call__(self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(), *,
                 seed: int | jax.Array = 0) -> SampleOutput:
        P = _round_up(max(len(p) for p in prompts), self.bucket)
        ids, mask = left_pad(prompts, self.pad_id, P)
        return self.generate_padded(ids, mask, params, seed=seed)

    def generate_padded(self, ids: np.ndarray, mask: np.ndarray, params: SamplingParams, *,
                        seed: int | jax.Array = 0) -> SampleOutput:
        """ids / mask [B, P] already left-padded (mask 1 = token)."""
        P = ids.shape[1]
        cache_len = _round_up(P + params.max_new_tokens, self.bucket)
        rng = jax.random.key(seed) if isinstance(seed, int) else seed
        tokens, logprobs, lengths, stopped = _generate(
            self.graphdef, self.state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
            jnp.asarray(stop_array(params.stop_tokens)), rng, max_new_tokens=params.max_new_tokens,
            temperature=float(params.temperature), top_k=params.top_k, top_p=float(params.top_p),
            cache_len=cache_len)
        return SampleOutput(tokens=np.asarray(tokens), lengths=np.asarray(lengths), logprobs=np.asarray(logprobs),
                            stopped=np.asarray(stopped))
