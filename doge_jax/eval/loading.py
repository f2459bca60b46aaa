"""What `--checkpoint` may name, turned into (model, tokenizer): a doge-jax checkpoint (local or gs://), or a
transformers Doge folder / Hub id converted on the fly.

    doge-jax workdir, its checkpoints/ folder or one step's folder   → doge_jax.load_model, WORKDIR/tokenizer
    gs://bucket/run[/checkpoints[/<step>]]                           → copied to a temp dir first (etils.epath;
                                                                       gcsfs must be installed), then as above
    a folder holding config.json, or a Hub id like SmallDoge/Doge-20M → convert.from_hf into a temp dir, then as
                                                                       above (the one route both take)
"""

from __future__ import annotations

import os
import re
import tempfile

from doge_jax import checkpoint as ckpt


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def is_hf_source(path: str) -> bool:
    """A transformers folder (config.json, no doge-jax checkpoints) or something shaped like a Hub id."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "config.json")) and not _has_doge_checkpoint(path)
    return not path.startswith(("gs://", ".", "/", "~")) and path.count("/") == 1


def _has_doge_checkpoint(path: str) -> bool:
    try:
        ckpt.resolve(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def copy_tree(src: str, dst: str) -> None:
    """Recursively copies `src` (any etils.epath path: gs://, local, ...) to the local folder `dst`."""
    from etils import epath

    src_path = epath.Path(src)
    if not src_path.is_dir():
        raise FileNotFoundError(f"checkpoint={src!r} is not a folder")
    os.makedirs(dst, exist_ok=True)
    for child in src_path.iterdir():
        target = os.path.join(dst, child.name)
        if child.is_dir():
            copy_tree(str(child), target)
        else:
            child.copy(target, overwrite=True)


def fetch_remote_checkpoint(src: str, dst: str, step: int | None = None) -> str:
    """Copies the one step an evaluation needs (and the tokenizer) from a remote workdir / step folder."""
    from etils import epath

    src = src.rstrip("/")
    path = epath.Path(src)
    if re.fullmatch(r"\d+", path.name) and (path / "params").is_dir():
        step_dir, workdir = path, path.parent.parent if path.parent.name == ckpt.CHECKPOINTS else path.parent
    else:
        root = path / ckpt.CHECKPOINTS if (path / ckpt.CHECKPOINTS).is_dir() else path
        steps = sorted(int(p.name) for p in root.iterdir() if re.fullmatch(r"\d+", p.name) and (p / "params").is_dir())
        if not steps:
            raise FileNotFoundError(f"checkpoint={src!r} holds no complete checkpoint "
                                    f"(expected {ckpt.CHECKPOINTS}/<step>/params or <step>/params)")
        if step is not None and step not in steps:
            raise ValueError(f"step={step} not in checkpoint={src!r} (has {steps})")
        chosen = steps[-1] if step is None else step
        step_dir, workdir = root / str(chosen), path
    copy_tree(str(step_dir), os.path.join(dst, ckpt.CHECKPOINTS, step_dir.name))
    if (workdir / ckpt.TOKENIZER).is_dir():
        copy_tree(str(workdir / ckpt.TOKENIZER), os.path.join(dst, ckpt.TOKENIZER))
    return dst


def load(checkpoint: str, *, tokenizer: str | None = None, step: int | None = None, **config_overrides):
    """(model, tokenizer, description) for any source named in the module docstring.

    `tokenizer` overrides the checkpoint's own (a folder or Hub id); a checkpoint without one needs it."""
    checkpoint = str(checkpoint)
    with tempfile.TemporaryDirectory(prefix="doge-eval-") as tmp:
        if checkpoint.startswith("gs://"):
            local = fetch_remote_checkpoint(checkpoint, tmp, step)
            step = None
        elif is_hf_source(checkpoint):
            # The converter lives in convert/ (it needs transformers' config classes); the eval CLI takes HF
            # checkpoints through it so there is one HF → doge-jax path, not two.
            from convert import from_hf

            local = from_hf(checkpoint, os.path.join(tmp, "from_hf"))
        else:
            local = checkpoint
        ref = ckpt.resolve(local, step)
        model = ckpt.load_model(local, step=step, **config_overrides)
        tok_dir = tokenizer or ref.tokenizer_dir
        if tok_dir is None:
            raise FileNotFoundError(f"checkpoint={checkpoint!r} has no {ckpt.TOKENIZER}/ folder; "
                                    "pass tokenizer=DIR_OR_HUB_ID")
        tok = load_tokenizer(tok_dir)
    return model, tok, f"{checkpoint}@{ref.step}"
