"""The KV-cache sampler: greedy parity with transformers' `generate`, stopping, filters, and the CLI.

The reference is a tiny random DogeForCausalLM (tests/hf_reference.py, `A` ≠ 0) converted with the production
converter. Prompts use distinct token ids so the DMA top-k has no ties (see dma.py); greedy tokens must match
exactly. The windowed case has keep_window_size 12 < the 20-token prompt and max_position_embeddings 16 with
dynamic NTK, so the top-k and the per-call NTK rescaling are both exercised on every decode step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import convert
import doge_jax
from doge_jax import sampler as sampler_lib
from doge_jax.sampler import Sampler, SamplingParams, left_pad
from hf_reference import make_hf_model

PAD = 0
NEW = 10


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.permutation(vocab - 1)[:n] + 1).tolist() for n in lengths]  # distinct ids, never PAD


def _hf_generate(hf_model, prompts, max_new_tokens, eos=None):
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        out = hf_model.generate(torch.from_numpy(ids.astype(np.int64)),
                                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    return out[:, ids.shape[1]:].numpy()


# (overrides, greedy tokens). Greedy decoding repeats tokens, and a repeated token has the same layer-0 `dt`, so
# once the sequence is longer than keep_window_size the top-k may hit ties that torch breaks arbitrarily: the
# windowed case decodes 10 tokens (a 20-token prompt, window 12: top-k on every step, ties not yet reached);
# the long case keeps the window above the 94 tokens and decodes 70, through a cache that grows mid-way.
CASES = {
    "long_grown_cache": (dict(keep_window_size=128, max_position_embeddings=128), 70),
    "window_and_dynamic_ntk": (dict(keep_window_size=12, max_position_embeddings=16,
                                    rope_parameters=dict(rope_type="dynamic", factor=4.0, rope_theta=10000.0)), NEW),
}


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    overrides, new_tokens = CASES[request.param]
    hf_model = make_hf_model(seed=7, **overrides)
    hf_model.save_pretrained(tmp / "hf")
    return hf_model, doge_jax.load_model(convert.from_hf(str(tmp / "hf"), str(tmp / "ckpt"))), new_tokens


def test_greedy_matches_transformers_generate(models):
    hf_model, model, new_tokens = models
    prompts = _prompts(hf_model.config.vocab_size, (20, 7, 13))  # left padding of 0, 13 and 7
    ref = _hf_generate(hf_model, prompts, new_tokens)
    out = Sampler(model, pad_id=PAD, bucket=8)(prompts, SamplingParams(max_new_tokens=new_tokens))
    np.testing.assert_array_equal(out.tokens, ref)
    assert out.lengths.tolist() == [new_tokens] * 3 and not out.stopped.any()


def test_stop_token_matches_transformers_eos(models):
    """Bucket 1 here vs 8 above: the amount of left padding changes nothing."""
    hf_model, model, _ = models
    prompts = _prompts(hf_model.config.vocab_size, (9, 15, 4), seed=1)
    free = _hf_generate(hf_model, prompts, NEW)
    eos = int(free[0, 3])  # row 0 stops by its 4th token; the others wherever (if ever) they emit the same id
    ref = _hf_generate(hf_model, prompts, NEW, eos=eos)
    out = Sampler(model, pad_id=PAD, bucket=1)(prompts, SamplingParams(max_new_tokens=NEW, stop_tokens=(eos,)))
    for b in range(3):
        n = int(out.lengths[b])
        np.testing.assert_array_equal(out.tokens[b, :n], ref[b, :n])
        assert out.stopped[b] == (eos in ref[b].tolist())
        if out.stopped[b]:
            assert out.tokens[b, n - 1] == eos and (ref[b, n:] == PAD).all()
    assert out.lengths[0] == free[0].tolist().index(eos) + 1


def test_sampled_logprobs_match_full_forward():
    """Cached decode == full forward: the log-probs the sampler reports for its (random) tokens are those of one
    forward pass over prompt + completion. Tolerance 1e-4 in fp32."""
    model = doge_jax.build(doge_jax.DogeConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=2, keep_window_size=6),
                           seed=3)
    prompts = [[5, 9, 2, 7], [11, 3]]
    params = SamplingParams(max_new_tokens=6, temperature=1.3, top_k=20, top_p=0.9)
    out = Sampler(model, pad_id=PAD, bucket=1)(prompts, params, seed=4)
    for b, prompt in enumerate(prompts):
        seq = np.array([prompt + out.tokens[b].tolist()], np.int32)
        logp = jax.nn.log_softmax(model(jnp.asarray(seq)).logits[0], axis=-1)
        expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.tokens[b])]
        np.testing.assert_allclose(out.logprobs[b], expected, atol=1e-4)
    # bfloat16 decoding (a cast copy of the weights): the same distribution to bf16 precision.
    low = Sampler(model, pad_id=PAD, bucket=1, dtype="bfloat16")(prompts, params, seed=4)
    seq = np.array([prompts[0] + low.tokens[0].tolist()], np.int32)
    logp = jax.nn.log_softmax(model(jnp.asarray(seq)).logits[0], axis=-1)
    expected = [float(logp[len(prompts[0]) - 1 + i, t]) for i, t in enumerate(low.tokens[0])]
    np.testing.assert_allclose(low.logprobs[0], expected, atol=0.1)
    assert model.cfg.dtype == "float32"  # the caller's model is untouched


def test_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: np.isfinite(np.asarray(sampler_lib.filter_logits(logits, temperature=1.0, **kw)))[0]  # noqa
    assert keep(top_k=2, top_p=1.0).tolist() == [True, True, False, False]
    assert keep(top_k=0, top_p=0.5).tolist() == [True, False, False, False]  # 0.5 reaches 0.5
    assert keep(top_k=0, top_p=0.7).tolist() == [True, True, False, False]
    assert keep(top_k=0, top_p=0.96).tolist() == [True, True, True, True]
    assert keep(top_k=3, top_p=0.85).tolist() == [True, True, True, False]
    toks, _ = sampler_lib.select_tokens(jnp.tile(logits, (64, 1)), jax.random.key(0), temperature=1.0, top_k=1,
                                        top_p=1.0)
    assert (np.asarray(toks) == 0).all()
    with pytest.raises(ValueError, match="top_p=0.0"):
        SamplingParams(top_p=0.0)


def test_generate_cli(tmp_path, capsys):
    from doge_jax import checkpoint as ckpt
    from doge_jax import generate
    from doge_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer("default")
    cfg = doge_jax.DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=2)
    ckpt.save_params(str(tmp_path / "run"), 3, ckpt.params_of(doge_jax.build(cfg)), cfg)
    tok.save_pretrained(str(tmp_path / "run" / "tokenizer"))
    rc = generate.main(["--checkpoint", str(tmp_path / "run"), "--chat", "--prompt", "Hi there", "--prompt", "2+2?",
                        "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("--- [") == 2 and "step 3" in captured.err
    assert generate.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
