"""The post-training losses as pure functions, against values computed by hand.

Logits are log-probabilities chosen as powers of 1/2, so every log-prob is a multiple of ln 2 and the expected
losses are closed forms (written next to each assertion). Tolerance 1e-6 (float32).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from doge_jax.model.loss import IGNORE_INDEX
from doge_jax.model.token_scores import scores_from_logits
from doge_jax.posttrain import dpo, grpo

LN2 = math.log(2.0)
V = 4  # vocab
A_TOK, B_TOK = 1, 2  # the two reply tokens of every sequence


def _logits_for(p_first: float, p_second: float) -> np.ndarray:
    """[T=4, V] logits whose log-softmax gives A_TOK prob p_first at t=0 and B_TOK prob p_second at t=1."""
    out = np.zeros((4, V), np.float32)
    for t, (tok, p) in enumerate(((A_TOK, p_first), (B_TOK, p_second))):
        rest = (1.0 - p) / (V - 1)
        out[t] = np.log(np.full(V, rest))
        out[t, tok] = math.log(p)
    return out


class FixedLogits:
    """A stand-in model: the same logits for any input (the loss plumbing is what is tested). With head=False
    its "hidden" state is those logits and its head (`logits`) the identity, so token_scores' chunked head
    returns them as they are."""

    cfg = SimpleNamespace(vocab_size=V)

    def __init__(self, logits):
        self.values = jnp.asarray(logits)

    def __call__(self, input_ids, *args, head=True, **kwargs):
        return SimpleNamespace(logits=self.values if head else None, hidden=None if head else self.values)

    def logits(self, hidden):
        return hidden


def _pair_batch():
    ids = np.array([7, A_TOK, B_TOK, 0], np.int32)
    targets = np.array([A_TOK, B_TOK, IGNORE_INDEX, IGNORE_INDEX], np.int32)  # aligned: the reply is 2 tokens
    row = lambda x: np.stack([x, x])[None]  # noqa: E731  [1, 2, T]
    return {"input_ids": row(ids), "targets": row(targets), "segment_ids": row(np.array([1, 1, 1, 0])),
            "positions": row(np.arange(4))}


# policy: chosen (1/2, 1/2) → −2 ln2, rejected (1/4, 1/4) → −4 ln2; reference: (1/2, 1/4) → −3 ln2 both.
POLICY = np.stack([_logits_for(0.5, 0.5), _logits_for(0.25, 0.25)])  # [2, T, V]: chosen row, rejected row
REF = np.stack([_logits_for(0.5, 0.25), _logits_for(0.25, 0.5)])


def test_sequence_logps():
    targets = jnp.asarray(_pair_batch()["targets"][0])
    logps, counts = dpo.sequence_logps(scores_from_logits(jnp.asarray(POLICY), targets), targets)
    np.testing.assert_allclose(logps, [-2 * LN2, -4 * LN2], atol=1e-6)
    assert counts.tolist() == [2, 2]


@pytest.mark.parametrize("loss_type,smoothing,expected", [
    # h = (−2 + 3) ln2 − (−4 + 3) ln2 = 2 ln2; β = 0.5: −log σ(ln 2) = −log(2/3) = ln 1.5
    ("sigmoid", 0.0, math.log(1.5)),
    # cDPO: 0.9·ln 1.5 + 0.1·(−log σ(−ln 2)) = 0.9·ln 1.5 + 0.1·ln 3
    ("sigmoid", 0.1, 0.9 * math.log(1.5) + 0.1 * math.log(3.0)),
    # IPO on per-token averages (2 tokens): h = ln 2, (ln 2 − 1/(2·0.5))² = (ln 2 − 1)²
    ("ipo", 0.0, (LN2 - 1.0) ** 2),
])
def test_dpo_loss_matches_hand_computed(loss_type, smoothing, expected):
    loss_fn = dpo.make_loss(beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    loss, metrics = loss_fn(FixedLogits(POLICY), _pair_batch(), jax.random.key(0), reference=FixedLogits(REF))
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    if loss_type == "sigmoid":
        assert float(metrics["reward_chosen"]) == pytest.approx(0.5 * LN2, abs=1e-6)  # β·(−2 + 3) ln2
        assert float(metrics["reward_rejected"]) == pytest.approx(-0.5 * LN2, abs=1e-6)
        assert float(metrics["reward_accuracy"]) == 1.0


def test_dpo_loss_direct_and_gradient_sign():
    out = dpo.dpo_loss(jnp.array([-2.0]), jnp.array([-4.0]), jnp.array([-3.0]), jnp.array([-3.0]), beta=0.1)
    assert float(out["losses"][0]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-6)  # h = 2
    g = jax.grad(lambda c, r: dpo.dpo_loss(c, r, jnp.zeros(1), jnp.zeros(1), beta=0.1)["losses"].sum(),
                 argnums=(0, 1))(jnp.zeros(1), jnp.zeros(1))
    assert g[0][0] < 0 < g[1][0]  # raise the chosen, lower the rejected
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=0.1, loss_type="hinge2")


def test_group_advantages():
    adv = grpo.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]), eps=0.0 + 1e-12)
    s = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    np.testing.assert_allclose(adv[0], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rtol=1e-5)
    np.testing.assert_allclose(adv[1], 0.0, atol=1e-6)  # a group that agrees teaches nothing


def test_grpo_objective_clip_and_kl():
    old = jnp.log(jnp.array([[0.2, 0.2], [0.2, 0.2]]))
    logps = old + jnp.log(1.5)  # ratio 1.5 everywhere
    ref = logps + jnp.log(0.5)  # π_ref / π = 1/2: k3 = 1/2 − ln(1/2) − 1 = ln 2 − 1/2
    adv = jnp.array([1.0, -1.0])
    mask = jnp.array([[1, 1], [1, 0]])
    out = grpo.grpo_objective(logps, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    k3 = LN2 - 0.5
    # row 0 (Â = 1): min(1.5, 1.2) = 1.2, clipped; row 1 (Â = −1): min(−1.5, −1.2) = −1.5, not clipped.
    per_token = [-(1.2 - 0.1 * k3), -(1.2 - 0.1 * k3), -(-1.5 - 0.1 * k3)]
    assert float(out["loss"]) == pytest.approx(np.mean(per_token), abs=1e-6)
    assert float(out["kl"]) == pytest.approx(k3, abs=1e-6)
    assert float(out["clip_frac"]) == pytest.approx(2 / 3, abs=1e-6)


def test_grpo_gradient_at_ratio_one_is_policy_gradient():
    logps = jnp.log(jnp.array([[0.3, 0.6, 0.1], [0.5, 0.5, 0.5]]))
    adv = jnp.array([2.0, -1.0])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    grad = jax.grad(lambda lp: grpo.grpo_objective(lp, jax.lax.stop_gradient(lp), lp, adv, mask, clip_eps=0.2,
                                                   kl_coef=0.5)["loss"])(logps)
    # KL is 0 with a zero gradient at π = π_ref; the surrogate's gradient is −Â / (number of tokens).
    np.testing.assert_allclose(grad, -adv[:, None] * mask / 5.0, atol=1e-6)


def test_grpo_loss_raises_a_reward():
    """The whole GRPO loss (in-step sampling, host reward callback, advantages, KL) on a random tiny model:
    with reward = the share of even token ids in a completion, 15 Adam steps move the sampled reward up."""
    import optax
    from flax import nnx

    import doge_jax

    cfg = doge_jax.DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2)

    class EvenTokens:
        names = ["even"]

        def __call__(self, tokens, lengths, index):
            return (tokens % 2 == 0).mean(axis=1, keepdims=True).astype(np.float32)

    loss_fn = grpo.make_loss(scorer=EvenTokens(), reward_weights=[1.0], group_size=8, max_new_tokens=4,
                             stop_tokens=(), temperature=1.0, kl_coef=0.01)
    graphdef, params, rest = nnx.split(doge_jax.build(cfg, seed=0), nnx.Param, ...)
    reference = doge_jax.build(cfg, seed=0)
    reference.eval()
    ref_def, ref_params = nnx.split(reference)
    tx = optax.adam(1e-2)
    batch = {"prompt_ids": jnp.array([[0, 5, 6, 7], [9, 10, 11, 12]], jnp.int32),
             "prompt_mask": jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.int32), "index": jnp.array([0, 1])}

    @jax.jit
    def step(params, opt, rng, ref_params):  # the reference's weights an argument, as the Trainer passes them
        f = lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, rng,  # noqa: E731
                              reference=nnx.merge(ref_def, ref_params))
        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, metrics["reward"]

    opt, curve = tx.init(params), []
    for i in range(15):
        params, opt, reward = step(params, opt, jax.random.key(i), ref_params)
        curve.append(float(reward))
    assert np.mean(curve[-5:]) > np.mean(curve[:5]) + 0.15, curve
