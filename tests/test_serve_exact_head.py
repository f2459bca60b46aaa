"""The int8 LM head's leading logits recomputed in float32 (serve/exact_head.py): the error bound holds for every
output of both kernels, and with it the head's argmax is float32's, also where logits are nearly tied, which the
int8 head alone gets wrong; the bfloat16 server holds its head that way."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import DogeConfig, DogeForCausalLM

from serve import exact_head, packed_linear
from serve.engine import Engine
from serve.quantize import ANY_ROWS, INT8_KERNELS, Int8Linear, available, quantize_linears
from serve.sampling import RequestSampling

from serve_fixtures import tiny_model_dir  # noqa: F401  (pytest fixture)


def needs(kernel: str) -> None:
    if kernel not in available():
        pytest.skip(f"{kernel} does not run here (available: {available()})")


CLUSTER = 16  # near-duplicate rows per cluster


def near_tie_head(vocab: int, width: int, seed: int, clusters: int = 9) -> torch.nn.Linear:
    """A random head holding `clusters` groups of CLUSTER rows that are one row each plus 0.1 % noise, scattered
    over the vocab (one in the ragged last chunk): `cluster_inputs` points at them, so a row's leading logits are
    a cluster's, within a few int8 steps of each other (the harshest case for an int8 argmax), yet not equal in
    float32."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=g) * 0.05)
        for at in cluster_rows(vocab, clusters):
            head.weight[at] = head.weight[at[0]] + torch.randn(CLUSTER, width, generator=g) * 5e-5
    return head


def cluster_rows(vocab: int, clusters: int) -> list[torch.Tensor]:
    """Each cluster's rows: evenly spread, the last at the vocab's end (past the last whole CHUNK)."""
    return [int(start) + torch.arange(CLUSTER) for start in torch.linspace(0, vocab - CLUSTER, clusters).long()]


def cluster_inputs(head: torch.nn.Linear, rows: int, seed: int) -> torch.Tensor:
    """Row m points at cluster m (its base row, scaled to a logit of ~10, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    w = head.weight.detach()
    bases = torch.stack([w[at[0]] for at in cluster_rows(w.shape[0], rows)])  # [rows, I]
    return bases / bases.norm(dim=1, keepdim=True) ** 2 * 10 + torch.randn(rows, w.shape[1], generator=g) * 0.3


def inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g) * torch.logspace(-1, 1.5, rows)[:, None]  # rows of many sizes


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_every_output_is_within_the_bound(kernel):
    """|y~ - y| <= A + k (|y~| + A) for every output (A: `slack`; k: the output's relative rounding), on plain
    random weights and on near-ties, rows of very different sizes."""
    needs(kernel)
    eps_y = exact_head.ROUNDING[kernel][1]
    k = eps_y / (1 - eps_y)
    for head in (near_tie_head(1000, 96, seed=1), torch.nn.Linear(96, 1000, bias=False)):
        q = Int8Linear.from_linear(head, table=[(ANY_ROWS, kernel)])
        x = inputs(12, 96, seed=2)
        approx = q.run(x, kernel)
        exact = x @ head.weight.detach().T
        w2, r2 = exact_head.weight_stats(head.weight.detach(), q.qweight, q.scales)
        a = torch.from_numpy(exact_head.slack(x.numpy(), kernel, w2, r2)).float()
        bound = a + k * (approx.abs() + a)
        err = (approx - exact).abs()
        assert (err <= bound).all(), float((err / bound).max())
        assert float((err / bound).max()) > 1e-3  # the bound is not vacuous either


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("rows", [1, 9])
def test_rescored_head_picks_float32s_argmax_among_near_ties(kernel, rows):
    """One row (the Python-float path) and several (the chunked path), a vocab with a ragged last chunk: the int8
    head alone disagrees with float32's argmax on most rows; rescored, on none; the leading logits are float32's,
    and only they moved."""
    needs(kernel)
    vocab, width = 4 * exact_head.CHUNK * 8 + 37, 96
    head = near_tie_head(vocab, width, seed=3)
    q = Int8Linear.from_linear(head, table=[(ANY_ROWS, kernel)])
    plain_wrong = 0
    for seed in range(6):
        x = cluster_inputs(head, rows, seed=10 + seed)
        ref = x @ head.weight.detach().T  # [rows, V] float32
        assert float(ref[0].topk(2).values.diff().abs()) < 0.01  # a near-tie at the top
        plain = q(x)
        q.rescore_leaders(head.weight.detach().contiguous())
        y = q(x)
        q.exact_rows = None
        plain_wrong += int((plain.argmax(-1) != ref.argmax(-1)).sum())
        assert torch.equal(y.argmax(-1), ref.argmax(-1))
        best = ref.argmax(-1)
        assert float((y[torch.arange(rows), best] - ref[torch.arange(rows), best]).abs().max()) <= 1e-5
        moved = (y != plain).sum(-1)
        assert int(moved.max()) <= 4 * CLUSTER, moved  # the cluster's leaders, not the whole vocab
    assert plain_wrong >= 2, plain_wrong  # the case is hard: the int8 head alone gets rows wrong


def test_quantize_linears_rescores_the_head_from_the_tied_embedding_or_a_kept_copy():
    """Tied: the embedding's own rows (no copy); untied: the head's float32 weight, kept; no other layer."""
    for tied in (True, False):
        config = DogeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = DogeForCausalLM(config).eval()
        weight = model.lm_head.weight.detach().clone()
        quantize_linears(model)
        head = model.lm_head
        assert isinstance(head, Int8Linear) and torch.equal(head.exact_rows, weight)
        shares = head.exact_rows.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert shares == tied
        others = [m for m in model.modules() if isinstance(m, Int8Linear) and m is not head]
        assert others and all(m.exact_rows is None for m in others)
        assert "leading outputs recomputed in float32" in repr(head)
    with pytest.raises(ValueError, match="expected float32"):
        head.rescore_leaders(torch.zeros(3, 64))


def test_a_float_kernel_row_count_is_left_alone():
    """Where the measured table runs the kept float32 weight, the head is exact already: nothing is recomputed."""
    head = near_tie_head(600, 64, seed=5, clusters=3)
    q = Int8Linear.from_linear(head, keep_float=True)
    q.rescore_leaders(head.weight.detach().contiguous())
    q.set_table([(ANY_ROWS, "float")])
    x = inputs(3, 64, seed=6)
    assert torch.equal(q(x), torch.nn.functional.linear(x, q.float_weight)) and q.rescored == 0


def test_a_bfloat16_engine_holds_its_head_in_int8_with_float32_leaders(tiny_model_dir, monkeypatch):
    """--dtype bfloat16: the head int8 (half a bf16 head's bytes) with exact leaders, its kernels measured at
    warm-up, and greedy decoding through it (its tokens against float32 `generate` on a trained model:
    test_serve_quality.py's servers); --dtype float32 leaves the head float32."""
    if not packed_linear.available(torch.bfloat16) or not available():
        pytest.skip("needs oneDNN's bfloat16 linear and an int8 kernel")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import serve.engine as engine_module

    choose, other = engine_module.kernel_choice.choose, []

    def recording_choose(*args, other_bytes=0, **kwargs):
        other.append(other_bytes)
        return choose(*args, other_bytes=other_bytes, **kwargs)

    monkeypatch.setattr(engine_module.kernel_choice, "choose", recording_choose)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for dtype in ("float32", "bfloat16"):
        engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, max_batch=2,
                        threads=1, dtype=dtype)
        head = engine.model.lm_head
        assert isinstance(head, Int8Linear) == (dtype == "bfloat16")
    assert head.exact_rows is not None
    tied = engine.model.config.tie_word_embeddings
    assert (head.exact_rows.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()) == tied
    engine.start()
    try:
        assert list(engine.int8_tables) == [(head.out_features, head.in_features)]
        # timed with the step's bfloat16 layers read between samples, as a step reads them between two heads
        assert other == [engine._step.float_weight_bytes()] and other[0] > 0

        async def run():
            handle = engine.submit([[5, 9, 13, 2]], RequestSampling(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                                    logprobs=0))
            return [lp.token_id for batch in [b async for b in handle.deltas()] for d in batch for lp in d.logprobs]

        assert len(asyncio.run(run())) == 8
    finally:
        engine.stop()
    assert head.rescored >= 8  # every step went through the leaders
