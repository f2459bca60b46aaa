"""doge-jax as an lm-evaluation-harness model: `lm_eval --model doge_jax --model_args checkpoint=CKPT ...`.

Tokenization copies lm-eval's `hf` backend (`HFLM`) on purpose — the same context/continuation split (lm-eval's
`TemplateLM._encode_pair`), the same BOS policy (`add_bos_token`, default: the tokenizer's own), the same
left-truncation to `max_length` and the same rolling windows — so the two backends score the same tokens and a
difference between them is a difference in the model, never in the bookkeeping.

    loglikelihood           → scoring.Scorer: batched, length-bucketed forward passes (few compiles)
    loglikelihood_rolling   → the same Scorer over lm-eval's disjoint rolling windows (prefix = BOS, else EOS)
    generate_until          → doge_jax.sampler (KV cache, jit-compiled decode), stop sequences: every token whose
                              text contains one ends a row at once; the text is then cut at the first stop
                              sequence, as lm-eval's post-processing does for every backend

Model args (`--model_args k=v,...`): checkpoint (local or gs:// doge-jax checkpoint, a transformers folder or a
Hub id), tokenizer (override), step, batch_size (rows per pass, default 16), max_batch_tokens (rows × length per
pass, default 8192), max_length (default: the model's max_position_embeddings), max_gen_toks (default 256),
add_bos_token, prefix_token_id, dtype (the compute dtype, e.g. bfloat16).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs
from lm_eval.models.utils import postprocess_generated_text
from tqdm import tqdm

from doge_jax import sampler as sampler_lib
from doge_jax.eval.scoring import Scorer

log = logging.getLogger("doge_jax.eval")

NAME = "doge_jax"


def _int_arg(name: str, value, minimum: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}") from None
    if out < minimum or out != float(value):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return out


@register_model(NAME)
class DogeJaxLM(TemplateLM):
    """The lm-eval `LM` over a doge-jax model. Build it from a checkpoint (`DogeJaxLM(checkpoint=...)`, what the
    CLI does) or around a model in memory (`DogeJaxLM(model=m, tokenizer=tok)`, what training-time eval does)."""

    def __init__(self, checkpoint: str | None = None, *, model: nnx.Module | None = None, tokenizer=None,
                 step: int | None = None, batch_size: int | str = 16, max_batch_tokens: int = 8192,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, dtype: str | None = None, mesh=None,
                 max_batch_size: int | None = None, device: str | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"model_args {sorted(unknown)} are not doge_jax arguments; known: checkpoint, "
                             "tokenizer, step, batch_size, max_batch_tokens, max_length, max_gen_toks, "
                             "add_bos_token, prefix_token_id, dtype")
        if (checkpoint is None) == (model is None):
            raise ValueError("give exactly one of checkpoint=PATH or model=MODEL")
        if device not in (None, "cpu", "cuda", "tpu", "gpu") and not str(device).startswith("cuda"):
            raise ValueError(f"device={device!r}: doge_jax runs on JAX's default backend; leave --device unset")
        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 16  # no probing: max_batch_tokens already bounds each pass
        self._batch_size = _int_arg("batch_size", batch_size)
        self.max_batch_tokens = _int_arg("max_batch_tokens", max_batch_tokens, 16)
        self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        if checkpoint is not None:
            from doge_jax.eval.loading import load

            overrides = {"dtype": dtype} if dtype else {}
            model, own_tokenizer, self.source = load(str(checkpoint), tokenizer=None if tokenizer is None
                                                     else str(tokenizer), step=step, **overrides)
            tokenizer = own_tokenizer
        else:
            if tokenizer is None:
                raise ValueError("model=... needs tokenizer=... (an HF tokenizer or a folder holding one)")
            if isinstance(tokenizer, str):
                from doge_jax.eval.loading import load_tokenizer

                tokenizer = load_tokenizer(tokenizer)
            self.source = "in-memory model"
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self._max_length = _int_arg("max_length", max_length) if max_length is not None else \
            int(self.cfg.max_position_embeddings)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.cfg.pad_token_id or 0)
        self.scorer = Scorer(model, pad_id=pad, batch_size=self._batch_size,
                             max_batch_tokens=self.max_batch_tokens, mesh=mesh)
        self._model = nnx.merge(self.scorer.graphdef, self.scorer.state)  # placed on the mesh when there is one
        self._sampler: sampler_lib.Sampler | None = None
        self._stop_token_cache: dict[tuple[str, ...], tuple[int, ...]] = {}

    # ---- what lm-eval asks of a model ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "model_num_parameters": self.num_parameters}

    @property
    def num_parameters(self) -> int:
        from doge_jax.model.decoder import count_params

        return count_params(self.cfg)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False  # the text already starts with BOS
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---- scoring -------------------------------------------------------------------------------------------------

    def _truncated(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """(tokens, n scored): what HFLM feeds, the last max_length + 1 tokens, scoring the continuation."""
        if not context or not continuation:
            raise ValueError(f"empty context ({len(context)} tokens) or continuation ({len(continuation)} tokens)")
        if len(continuation) > self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
        return (context + continuation)[-(self.max_length + 1):], len(continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context ids, continuation ids) → (sum logprob, all greedy)."""
        scored = self.scorer([self._truncated(list(ctx), list(cont)) for _, ctx, cont in
                              tqdm(requests, desc="doge_jax loglikelihood", disable=disable_tqdm)])
        out = []
        for (pair, _, _), (logprobs, greedy) in zip(requests, scored):
            answer = (float(np.sum(logprobs, dtype=np.float64)), bool(np.all(greedy)))
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of max_length tokens, the first conditioned on
        prefix_token_id, each later one on the max_length tokens before it (lm-eval's windows, as HFLM)."""
        windows, owners = [], []
        for i, (string,) in enumerate([r.args for r in requests]):
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------------

    def _stop_tokens(self, until: list[str]) -> tuple[int, ...]:
        """EOS plus every token whose own text contains a stop sequence: once one is sampled the text will be
        cut at or before it, so decoding further cannot change the answer."""
        key = tuple(u for u in until if u)
        if key not in self._stop_token_cache:
            ids = {int(self.eot_token_id)}
            eos = self.cfg.eos_token_id
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
            if key:
                for t in range(len(self.tokenizer)):
                    text = self.tokenizer.decode([t], skip_special_tokens=False)
                    if any(u in text for u in key):
                        ids.add(t)
            self._stop_token_cache[key] = tuple(sorted(ids))
        return self._stop_token_cache[key]

    def _get_sampler(self) -> sampler_lib.Sampler:
        if self._sampler is None:
            self._sampler = sampler_lib.Sampler(self._model, pad_id=self.scorer.pad_id)
        return self._sampler

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by generation kwargs, longest first, batched by `batch_size` (rows padded to a power
        of two so a few programs serve every batch)."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        args = [r.args for r in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="doge_jax generate_until", disable=disable_tqdm)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(args[members[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be below max_length={self.max_length}")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            params = sampler_lib.SamplingParams(
                max_new_tokens=max_new, temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                top_p=float(kwargs.pop("top_p", 1.0) or 1.0), stop_tokens=self._stop_tokens(until))
            encoded = {i: self.tok_encode(args[i][0], left_truncate_len=self.max_length - max_new) for i in members}
            order = sorted(members, key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                prompts = [encoded[i] or [self.prefix_token_id] for i in chunk]
                rows = 1 << (len(prompts) - 1).bit_length()
                prompts += [[self.prefix_token_id]] * (rows - len(prompts))
                result = self._get_sampler()(prompts, params, seed=1234 + start)
                for row, i in enumerate(chunk):
                    text = self.tok_decode(result.tokens[row, :result.lengths[row]].tolist())
                    text = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", args[i], text)
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out
