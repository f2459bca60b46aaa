"""Chat encoding, loss masks, packing, record loading and the batch sources of SFT / DPO / GRPO.

Everything uses the shipped tokenizer (doge_jax/assets/tokenizer) and the built-in datasets: no network.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import doge_jax
from doge_jax.model.loss import IGNORE_INDEX
from doge_jax.posttrain import chat, datasets, dpo, grpo, records, rewards, sft, stages
from doge_jax.data.tokenizer import load_tokenizer

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"},
         {"role": "assistant", "content": "The answer is 7.", "reasoning_content": "3 + 4 = 7"},
         {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}]


@pytest.fixture(scope="module")
def tok():
    return chat.set_chat_template(load_tokenizer("default"), "default")


def test_loss_mask_covers_assistant_turns_only(tok):
    ids, mask = chat.encode_chat(tok, CONVO)
    assert tok.decode(ids[mask]) == "The answer is 7.<|im_end|>\nThe answer is 4.<|im_end|>\n"
    # The unmasked text is the whole conversation up to each reply, i.e. exactly what a server would feed.
    prompt = chat.encode_prompt(tok, CONVO[:2])
    np.testing.assert_array_equal(ids[:len(prompt)], prompt)
    ids_last, mask_last = chat.encode_chat(tok, CONVO, train_on="last")
    assert tok.decode(ids_last[mask_last]) == "The answer is 4.<|im_end|>\n"
    assert tok.eos_token == chat.IM_END  # a server stopping at eos stops at the end of a turn


def test_thinking_template():
    tok = chat.set_chat_template(load_tokenizer("default"), "thinking")
    ids, mask = chat.encode_chat(tok, CONVO)
    assert tok.decode(ids[mask]) == ("3 + 4 = 7\n</think>\nThe answer is 7.<|im_end|>\n"
                                     "\n</think>\nThe answer is 4.<|im_end|>\n")  # an empty thought without reasoning
    assert chat.render(tok, CONVO[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n")


def test_sft_rows_unpacked_and_packed(tok):
    recs = [{"messages": CONVO}, {"prompt": "Hi", "completion": "Hello!"}, {"messages": CONVO[:3]}]
    for packing in (False, True):
        asm = sft.SFTAssembler(tok, recs, seq_len=96, packing=packing, pad_id=tok.pad_token_id)
        stream = records.IndexStream(np.arange(3), seed=0, shuffle=False)
        batch = asm(stream, rows=2)
        for r in range(2):
            ids, targets, seg, pos = (batch[k][r] for k in ("input_ids", "targets", "segment_ids", "positions"))
            for s in set(seg[seg > 0].tolist()):
                where = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart
                assert targets[where[-1]] == IGNORE_INDEX  # nothing predicted across a segment boundary
            counted = targets != IGNORE_INDEX
            shifted = np.roll(ids, -1)
            np.testing.assert_array_equal(targets[counted], shifted[counted])  # targets are the next tokens
            assert (seg[counted] > 0).all()
        if packing:
            assert batch["segment_ids"][0].max() == 2  # convo 0 (~60 tokens) + the short one share row 0
        else:
            assert batch["segment_ids"].max() == 1
    expected = chat.encode_chat(tok, CONVO)
    ids, mask = expected
    np.testing.assert_array_equal(batch["targets"][0][:len(ids) - 1][mask[1:]], ids[1:][mask[1:]])


def test_stream_state_resumes_exactly(tok):
    recs = datasets.sft_mix(num=40)
    asm = sft.SFTAssembler(tok, recs, seq_len=64, packing=True, pad_id=tok.pad_token_id)
    make = records.make_source(len(recs), asm, eval_fraction=0.1, seed=3)
    it = make(split="train", shard_index=0, shard_count=1, rows=4)
    for _ in range(12):  # several epochs of 36 records
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the checkpoint stores JSON
    expected = next(it)
    again = make(split="train", shard_index=0, shard_count=1, rows=4)
    again.set_state(state)
    got = next(again)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    train = set(records.split_indices(40, 0.1, "train").tolist())
    held = set(records.split_indices(40, 0.1, "eval").tolist())
    assert len(held) == 4 and not train & held and len(train | held) == 40
    ev = make(split="eval", shard_index=0, shard_count=1, rows=2, num_batches=3)
    assert len(list(ev)) == 3


def test_record_files(tmp_path, tok):
    rows = datasets.prefs(num=5)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert records.load_records(str(path)) == rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(datasets.chat(num=4)), tmp_path / "chat.parquet")
    import datasets as hf_datasets

    hf_datasets.Dataset.from_list(datasets.chat(num=3)).save_to_disk(str(tmp_path / "hf"))
    got = records.load_records(f"{tmp_path}/chat.parquet, {tmp_path}/hf, builtin:chat")
    assert len(got) == 4 + 3 + 1000 and got[0]["messages"][-1]["role"] == "assistant"
    with pytest.raises(ValueError, match="arith_prompts"):
        records.load_records("builtin:nope")
    with pytest.raises(ValueError, match="matched no files"):
        records.load_records(str(tmp_path / "missing.jsonl"))


def test_builtin_answers_earn_full_reward(tok):
    """The SFT data and the GRPO rewards agree: every built-in arithmetic reply scores 1 on format and answer."""
    for rec in datasets.arith(num=50):
        reply = rec["messages"][-1]["content"]  # "a op b = c. The answer is c."
        equation = reply.split(". The answer")[0]
        left, answer = equation.split(" = ")
        a, op, b = left.split(" ")
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert rewards.score([reply], [{"answer": answer}], ["format", "answer"]).tolist() == [[1.0, 1.0]]
    think = datasets.arith(num=5, think=True)[0]["messages"][-1]
    text = think["reasoning_content"] + "\n</think>\n" + think["content"]
    assert rewards.think_format_reward(text, {}) == 1.0
    assert rewards.score(["The answer is 12.", "the answer: 12", "The answer is 13."],
                         [{"answer": "12"}] * 3, ["format", "answer"]).tolist() == [[1, 1], [0, 0], [1, 0]]
    for rec in datasets.arith_prompts(num=20):
        assert "answer" in rec and rec["prompt"][-1]["role"] == "user"


def test_dpo_and_grpo_sources(tok):
    cfg = doge_jax.DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=2)
    ref = doge_jax.build(cfg)
    recs = datasets.prefs(num=6)
    asm = dpo.DPOAssembler(tok, recs, seq_len=64, pad_id=tok.pad_token_id)
    batch = asm(records.IndexStream(np.arange(6), seed=0, shuffle=False), rows=2)
    assert batch["input_ids"].shape == (2, 2, 64)
    ref_logps, counts = dpo.pair_logps(ref, {k: jnp.asarray(v) for k, v in batch.items()})  # [2, 2] each
    assert np.isfinite(ref_logps).all() and (ref_logps < 0).all() and (counts > 0).all()
    # The policy equal to the reference: h = 0, the sigmoid loss is ln 2.
    loss, _ = dpo.make_loss(beta=0.1)(ref, {k: jnp.asarray(v) for k, v in batch.items()}, None, reference=ref)
    assert float(loss) == pytest.approx(np.log(2.0), abs=1e-6)
    for r in range(2):  # chosen and rejected share the prompt, then differ in the reply (the counted tokens)
        chosen, rejected = batch["targets"][r]
        first = np.flatnonzero(chosen != IGNORE_INDEX)[0]
        np.testing.assert_array_equal(batch["input_ids"][r, 0, :first], batch["input_ids"][r, 1, :first])
        assert (rejected != IGNORE_INDEX).any()

    prompts = datasets.arith_prompts(num=4)
    pa = grpo.PromptAssembler(tok, prompts, max_prompt_len=40, pad_id=tok.pad_token_id)
    b = pa(records.IndexStream(np.arange(4), seed=0, shuffle=False), rows=3)
    first = chat.encode_prompt(tok, prompts[0]["prompt"])
    np.testing.assert_array_equal(b["prompt_ids"][0, 40 - len(first):], first)  # left-padded
    assert b["prompt_mask"][0].sum() == len(first) and b["index"].tolist() == [0, 1, 2]


def test_stage_config_errors():
    from configs import tiny_grpo

    config = tiny_grpo.get_config()
    config.grpo.group_size = 1
    with pytest.raises(ValueError, match=r"config\.grpo\.group_size=1"):
        stages.check(config)
    config = tiny_grpo.get_config()
    config.grpo.rewards = "format,bogus"
    with pytest.raises(ValueError, match="bogus"):
        stages.check(config)
    config = tiny_grpo.get_config()
    with pytest.raises(ValueError, match="needs a frozen reference"):
        stages.trainer_kwargs(config)


@pytest.mark.parametrize("name", ["tiny_pretrain", "tiny_sft", "tiny_distill", "tiny_dpo", "tiny_grpo",
                                  "doge_20m_sft", "doge_20m_dpo", "doge_20m_grpo"])
def test_stage_configs_validate(name):
    import importlib

    from doge_jax.trainer import validate

    config = importlib.import_module(f"configs.{name}").get_config()
    stages.check(config)
    validate.check(config, validate.model_config(config.model))
