"""Tokenizers: train a SentencePiece BPE model, export it as a HF tokenizer dir, and load one.

Every tokenizer this project uses is a `transformers` tokenizer backed by a `tokenizer.json`, so the trainer,
the converters and the serving box all load it the same way (`AutoTokenizer.from_pretrained(dir)`).

Training (`python -m doge_jax.cli.tokenizer train --corpus default --vocab-size 8192 --out DIR`) runs
SentencePiece BPE in the Llama style (byte fallback, digits split, no normalisation, whitespace kept so code
indentation survives), then converts it with transformers' own SentencePiece extractor into a
`LlamaTokenizer` whose ids match the SentencePiece model exactly. The special tokens have fixed ids:

    0 <unk>   1 <s> (bos)   2 </s> (eos)   3 <pad>   4 <|im_start|>   5 <|im_end|>

and the Doge chat template `<|im_start|>{role}\\n{content}<|im_end|>\\n` (plus `<|im_start|>assistant\\n`
when `add_generation_prompt=True`) is saved with it.

The shipped default tokenizer (`doge_jax/assets/tokenizer/`) was made on the default corpus with

    python -m doge_jax.cli.tokenizer train --corpus default --vocab-size 8192 --out doge_jax/assets/tokenizer
"""

from __future__ import annotations

from doge_jax import storage
from doge_jax.errors import ConfigError

import copy
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                     "tokenizer")
# The Doge chat template, one file: the shipped tokenizer, every tokenizer trained here, the exporter (which
# copies the tokenizer folder) and the serve tests all use it.
CHAT_TEMPLATE_FILE = os.path.join(DEFAULT_TOKENIZER_DIR, "chat_template.jinja")
with open(CHAT_TEMPLATE_FILE, encoding="utf-8") as _f:
    CHAT_TEMPLATE = _f.read()

# SentencePiece refuses longer "sentences"; our sentences are lines, and the rare longer line is dropped.
_MAX_SENTENCE_BYTES = 16384


def load_tokenizer(spec: str):
    """Loads a tokenizer: 'default' (the shipped asset), a local HF tokenizer dir, or a hub id.

    Returns a `transformers.PreTrainedTokenizerBase`. A hub id (e.g. 'SmallDoge/Doge-tokenizer') needs the
    network or a populated HF cache; a path that looks local but does not exist is an error, not a hub lookup.
    A gs:// folder is downloaded (a few small files) and loaded from the copy.
    """
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top  (heavy; keep the CLI light)

    if not isinstance(spec, str) or not spec:
        raise ConfigError(f'config.data.tokenizer={spec!r} must be "default", a tokenizer directory or a hub id')
    if storage.is_remote(spec):
        field = "config.data.tokenizer"
        storage.check_reachable(storage.path(spec, field=field), field=field)
        if not (storage.path(spec) / "tokenizer_config.json").exists():
            raise ConfigError(f"{field}={spec!r} holds no tokenizer_config.json")
        return storage.with_local_dir(spec, AutoTokenizer.from_pretrained)
    path = DEFAULT_TOKENIZER_DIR if spec == "default" else os.path.expanduser(spec)
    looks_local = spec == "default" or os.path.isabs(path) or spec.startswith(".") or os.path.exists(path)
    if looks_local:
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
            os.path.join(path, "tokenizer_config.json")
        ):
            raise ConfigError(f"config.data.tokenizer={spec!r}: {path} holds no tokenizer.json / tokenizer_config.json")
        return AutoTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise ConfigError(f"config.data.tokenizer={spec!r} is neither a local tokenizer dir nor a loadable hub id ({e})") from e


def save_for_export(tokenizer, out_dir: str, *, add_bos: bool | None) -> None:
    """`save_pretrained` of a copy that encodes the way training did: `tokenizer(text)` puts BOS first iff
    `add_bos` (data.add_bos; None = leave as is) and never appends EOS (EOS ends a training document, not a
    prompt). Both the tokenizer.json post-processor and tokenizer_config.json's add_bos_token say so, so every
    loader (transformers, tokenizers, the server) agrees."""
    tok = copy.deepcopy(tokenizer)
    if add_bos is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)  # rebuilds the post-processor (LlamaTokenizer / TokenizersBackend)
        if hasattr(tok, "add_eos_token"):
            tok.add_eos_token = False
    tok.save_pretrained(out_dir)
    if add_bos is None:
        return
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(add_bos_token=bool(add_bos), add_eos_token=False)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _lines(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip() and len(line.encode()) <= _MAX_SENTENCE_BYTES:
                yield line


def train_sentencepiece(documents: Iterable[str], vocab_size: int, *, num_threads: int = 2) -> bytes:
    """Trains a Llama-style SentencePiece BPE model on `documents`; returns the serialized model."""
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(documents),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,  # never <unk>: any UTF-8 byte has a piece
        split_digits=True,
        normalization_rule_name="identity",  # the HF tokenizer below has no normaliser either
        remove_extra_whitespaces=False,  # keep indentation and double spaces
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=SPECIAL_TOKENS["unk"],
        bos_piece=SPECIAL_TOKENS["bos"],
        eos_piece=SPECIAL_TOKENS["eos"],
        pad_piece=SPECIAL_TOKENS["pad"],
        control_symbols=list(CHAT_TOKENS),
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=num_threads,
        minloglevel=2,
    )
    return model.getvalue()


def export_hf_tokenizer(spm_model: bytes, out_dir: str, *, extra_config: dict | None = None) -> None:
    """Writes a `transformers` tokenizer dir (tokenizer.json + config) equivalent to `spm_model`.

    The dir is written next to `out_dir` and renamed into place, so a failure leaves nothing half-written.
    """
    from tokenizers.models import BPE  # pylint: disable=g-import-not-at-top
    from transformers import LlamaTokenizer  # pylint: disable=g-import-not-at-top
    from transformers.convert_slow_tokenizer import SentencePieceExtractor  # pylint: disable=g-import-not-at-top

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        model_path = os.path.join(tmp, "spm.model")
        with open(model_path, "wb") as f:
            f.write(spm_model)
        extracted = SentencePieceExtractor(model_path).extract(BPE)
        os.remove(model_path)  # tokenizer.json is the single source of truth; keeps the asset small
        tok = LlamaTokenizer(
            vocab=extracted["vocab"],
            merges=extracted["merges"],
            unk_token=SPECIAL_TOKENS["unk"],
            bos_token=SPECIAL_TOKENS["bos"],
            eos_token=SPECIAL_TOKENS["eos"],
            pad_token=SPECIAL_TOKENS["pad"],
            legacy=False,
            add_prefix_space=True,
            model_max_length=1 << 20,
        )
        tok.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(tmp)
        if extra_config:
            with open(os.path.join(tmp, "doge_tokenizer.json"), "w") as f:
                json.dump(extra_config, f, indent=2, sort_keys=True)
                f.write("\n")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a tokenizer dir is meant to be shared
        os.rename(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def corpus_documents(corpus: Sequence[str]) -> Iterator[str]:
    """Documents of `--corpus`: 'default', or text / jsonl / parquet files (globs ok)."""
    for spec in corpus:
        if spec == "default":
            from doge_jax.data._corpus import default_corpus  # pylint: disable=g-import-not-at-top

            yield from default_corpus()
            continue
        paths = sorted(glob.glob(os.path.expanduser(spec)))
        if not paths:
            raise ValueError(f"--corpus={spec!r} matched no files")
        from doge_jax.data import _sources  # pylint: disable=g-import-not-at-top

        for path in paths:
            docs = _sources.documents_of_file(path)
            for i in range(len(docs)):
                yield docs[i]


def train_tokenizer(corpus: Sequence[str], vocab_size: int, out_dir: str) -> None:
    """Trains on `corpus` (see `corpus_documents`) and writes a HF tokenizer dir to `out_dir`."""
    if vocab_size < 256 + 6 + 16:
        raise ValueError(f"--vocab-size={vocab_size} must be >= 278 (256 byte pieces + 6 specials + some merges)")
    model = train_sentencepiece(corpus_documents(corpus), vocab_size)
    from doge_jax.data._corpus import corpus_version  # pylint: disable=g-import-not-at-top

    made_by = {
        "command": f"python -m doge_jax.cli.tokenizer train --corpus {' '.join(corpus)} "
        f"--vocab-size {vocab_size} --out {out_dir}",
        "corpus": [corpus_version() if c == "default" else c for c in corpus],
        "vocab_size": vocab_size,
    }
    export_hf_tokenizer(model, out_dir, extra_config=made_by)
