"""Where files go: local paths and `gs://` URLs, through `etils.epath` (what Orbax itself uses).

Every path doge-jax reads or writes (workdir, checkpoints, metrics, TensorBoard, loss.png, tokenizer folders,
data files and globs, converter outputs, pretokenized shards) goes through `path()`, so a `gs://bucket/run` is
a bucket prefix on every host, never a local folder named `./gs:/bucket/run`. An unknown scheme (`s3://`,
`http://`, ...) is a one-line `ConfigError` naming the field.

What each library needs for `gs://`:
  epath (our own reads/writes, globs)  fsspec's gcsfs
  Orbax (checkpoint arrays)            tensorstore's `gcs` driver (epath for its metadata files)
  datasets.load_dataset(data_files)    fsspec's gcsfs
  ArrayRecord shards                   C++ readers open local files only: `local_copy()` caches them

The emulator contract: with `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` set, importing this module points
all of them at that server (tensorstore's `TENSORSTORE_GCS_HTTP_URL`, a fixed test token instead of Google
credentials, gcsfs's anonymous token, and gcsfs's zonal-bucket probe off: it talks gRPC to the real service and
waits a minute). Nothing else needs setting; variables already set by the user are left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

from etils import epath

from doge_jax.errors import ConfigError

SCHEMES = ("gs",)  # besides local paths; what is tested (against a GCS emulator)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _configure_emulator() -> None:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no credential lookup
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read by gcsfs at import
    os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")  # fsspec's env config, read at fsspec import
    try:
        import fsspec.config

        fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")  # when fsspec was imported first
    except ImportError:
        pass


_configure_emulator()


def scheme(p) -> str | None:
    """'gs' for a gs:// URL, None for a local path."""
    m = _URL.match(os.fspath(p) if not isinstance(p, str) else p)
    return m.group(1).lower() if m else None


def is_remote(p) -> bool:
    return scheme(str(p)) is not None


def path(p, *, field: str = "path") -> epath.Path:
    """`p` as an epath.Path: a gs:// URL as is, a local path expanded (~) and made absolute.

    field: the config field or flag it came from, for the error (`config.data.path`, `--workdir`)."""
    if isinstance(p, epath.Path) and is_remote(p):
        return p
    text = os.fspath(p)
    s = scheme(text)
    if s is None:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if s not in SCHEMES:
        raise ConfigError(f"{field}={text!r}: the scheme {s}:// is not supported (a local path or gs://bucket/...)")
    if not re.match(r"^gs://[^/]+", text):
        raise ConfigError(f"{field}={text!r} names no bucket (gs://BUCKET/path)")
    return epath.Path(text)


def join(p, *parts) -> str:
    """A local path or gs:// URL joined with parts, as a string."""
    return str(path(p).joinpath(*parts)) if is_remote(p) else os.path.join(os.fspath(p), *parts)


def check_reachable(p, *, field: str) -> None:
    """Fails with one line when a gs:// location cannot be read: a missing bucket, no credentials, no
    network. Writes nothing. Local paths pass (their parent is created when written)."""
    if not is_remote(p):
        return
    url = str(p)
    bucket = epath.Path(re.match(r"^gs://[^/]+", url).group(0))
    try:
        ok = bucket.exists()
    except Exception as e:  # pylint: disable=broad-except  (auth, network and HTTP errors all mean "unusable")
        raise ConfigError(f"{field}={url!r}: cannot reach the bucket ({type(e).__name__}: {_one_line(e)})") from None
    if not ok:
        raise ConfigError(f"{field}={url!r}: the bucket {str(bucket)!r} does not exist or is not visible "
                          "with these credentials")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def glob(spec: str, *, field: str) -> list[str]:
    """Files matching a path, directory or glob (local or gs://), sorted. A directory means its files."""
    if not is_remote(spec):
        import glob as glob_lib

        spec = os.path.expanduser(spec)
        if os.path.isdir(spec):
            return sorted(p for p in glob_lib.glob(os.path.join(spec, "*")) if os.path.isfile(p))
        return sorted(p for p in glob_lib.glob(spec) if os.path.isfile(p))
    check_reachable(spec, field=field)
    p = path(spec, field=field)
    if not has_glob(spec):
        if p.is_dir():
            return sorted(str(c) for c in p.iterdir() if not c.is_dir())
        return [str(p)] if p.exists() else []
    parts = spec[len("gs://"):].split("/")
    first = next(i for i, part in enumerate(parts) if has_glob(part))
    base = epath.Path("gs://" + "/".join(parts[:first]))
    pattern = "/".join(parts[first:])
    return sorted(str(m) for m in base.glob(pattern) if not m.is_dir())


def open_file(p, mode: str = "rb"):
    """A file object for a local path or a gs:// URL (range reads on gs://, so seek works)."""
    if is_remote(p):
        return path(p).open(mode)
    return open(p, mode)  # pylint: disable=unspecified-encoding  (binary or explicit by the caller)


@contextlib.contextmanager
def _replacing(local: str) -> Iterator:
    """A binary file to write `local` through: a temp file beside it, renamed onto it only when the block
    ends without an error (removed otherwise), so readers never see half a file."""
    directory = os.path.dirname(os.fspath(local))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(p, data: bytes) -> None:
    """Writes a whole file: a temp file renamed onto `p` locally; one object upload on gs:// (an object
    appears only when its upload completes), so readers never see half a file."""
    if is_remote(p):
        path(p).write_bytes(data)
        return
    with _replacing(p) as f:
        f.write(data)


def upload_dir(local_dir: str, dest, *, last: tuple[str, ...] = ()) -> None:
    """Copies a finished local folder's files to `dest` (gs://...), the names in `last` after all others, so a
    reader that checks for them (config.json, tokenizer_config.json) never sees a half-copied folder."""
    names = sorted(os.listdir(local_dir), key=lambda n: (n in last, n))
    target = path(dest)
    for name in names:
        src = os.path.join(local_dir, name)
        if os.path.isdir(src):
            upload_dir(src, target / name)
        else:
            (target / name).write_bytes(open(src, "rb").read())


def download_dir(src, local_dir: str) -> str:
    """Copies the files of a gs:// folder (recursively) into `local_dir`; returns it."""
    os.makedirs(local_dir, exist_ok=True)
    for child in path(src).iterdir():
        dst = os.path.join(local_dir, child.name)
        if child.is_dir():
            download_dir(child, dst)
        else:
            with open(dst, "wb") as f:
                f.write(child.read_bytes())
    return local_dir


@contextlib.contextmanager
def local_folder(dest) -> Iterator[str]:
    """A local folder to write a folder's files into, which become `dest` on success (renamed locally,
    uploaded to gs://); on failure nothing reaches `dest`."""
    if not is_remote(dest):
        dest = os.path.abspath(os.path.expanduser(os.fspath(dest)))
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}-", dir=parent)
        try:
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; these folders are meant to be shared
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
        return
    tmp = tempfile.mkdtemp(prefix=".doge-upload-")
    try:
        yield tmp
        upload_dir(tmp, dest, last=("config.json", "tokenizer_config.json", "metadata.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _object_version(p) -> str:
    """What identifies the current bytes of gs:// object `p`: its size and generation (a new generation on
    every overwrite, even one of the same size), asked of the server, never of gcsfs's listing cache."""
    import fsspec  # pylint: disable=g-import-not-at-top  (only for gs://)

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache(str(p))
    info = fs.info(str(p))
    version = info.get("generation") or info.get("md5Hash") or info.get("crc32c") or info.get("updated")
    return f"{info['size']}:{version}"


def local_copy(p, *, cache_dir: str | None = None) -> str:
    """A local path for file `p`: itself when local; for gs:// a cached download, fetched again when the
    object's generation changed (a sidecar `<file>.version` records which one the copy holds). For readers
    that open only local files (ArrayRecord's C++ reader, the jsonl byte-offset reader)."""
    if not is_remote(p):
        return os.fspath(p)
    cache_dir = cache_dir or os.environ.get("DOGE_JAX_CACHE") or os.path.expanduser("~/.cache/doge_jax/gcs")
    local = os.path.join(cache_dir, str(p)[len("gs://"):])
    version = _object_version(p)
    marker = local + ".version"
    if os.path.isfile(local) and os.path.isfile(marker):
        with open(marker) as f:
            if f.read() == version:
                return local
    with _replacing(local) as out, open_file(p) as src:  # streamed (shards are large), then the marker
        shutil.copyfileobj(src, out, 1 << 24)
    write_bytes_atomic(marker, version.encode())
    return local


def with_local_dir(p, use: Callable[[str], object]):
    """Calls `use(local_dir)` on a folder: itself when local, a downloaded copy of a gs:// folder."""
    if not is_remote(p):
        return use(os.fspath(p))
    with tempfile.TemporaryDirectory(prefix=".doge-download-") as tmp:
        return use(download_dir(p, tmp))
