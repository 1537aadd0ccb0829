"""Text corpora through `datasets`, tokenised and packed into fixed-length blocks.

Returns numpy token blocks of shape (n, seq_len + 1): inputs are ``[:, :-1]``,
targets ``[:, 1:]``, so each block holds ``seq_len`` training tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..config import ConfigError
from ..records import PICKLE_SUFFIXES
from ..redact import redact_text

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Corpus:
    train: np.ndarray  # (n_train, seq_len + 1) int32
    val: np.ndarray  # (n_val, seq_len + 1) int32

    @property
    def train_tokens(self) -> int:
        """N of DESIGN §2: training target tokens."""
        return int(self.train.shape[0] * (self.train.shape[1] - 1))

    @property
    def val_tokens(self) -> int:
        return int(self.val.shape[0] * (self.val.shape[1] - 1))


def python_docs_texts() -> list:
    """The CPython documentation topics that ship with Python (pydoc_data), one document each."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = re.sub(r"\n{3,}", "\n\n", topics[name]).strip()
        if text:
            docs.append(text)
    return docs


_TEXT_FILES_ALLOWED = ("allowed existing .txt/.text/.md, .jsonl/.json or .parquet files, all of one kind, "
                       "read through `datasets`' text/json/parquet builders (scripts and pickles are never run or loaded)")
# Never handed to `datasets`: loading scripts and pickles (unpickling runs code).
_UNSAFE_SUFFIXES = (".py", ".pyc", ".pyw") + PICKLE_SUFFIXES


def _text_files_dataset(cfg):
    import datasets

    paths = [str(p) for p in cfg.paths]
    bad = [p for p in paths if Path(p).suffix.lower() not in _BUILDERS]
    if bad:
        raise ConfigError(f"data.paths={[redact_text(p) for p in bad]}: not a data file; {_TEXT_FILES_ALLOWED}")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"data.paths={[redact_text(p) for p in missing]}: no such file; {_TEXT_FILES_ALLOWED}")
    kinds = {_BUILDERS[Path(p).suffix.lower()] for p in paths}
    if len(kinds) != 1:
        raise ConfigError(f"data.paths={[redact_text(p) for p in paths]}: files of {len(kinds)} kinds; {_TEXT_FILES_ALLOWED}")
    builder = kinds.pop()
    # a packaged builder (no script); trust_remote_code=False for `datasets` versions that still know it
    ds = datasets.load_dataset(builder, data_files=paths, split="train", trust_remote_code=False)
    field = "text" if builder == "text" else cfg.text_field
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field={field!r}: not a column; allowed: {ds.column_names}")
    return ds, field


def _check_stream_path(hf_path: str) -> None:
    """A local ``data.hf_path`` must be a folder of data files: no loading script, no pickle."""
    local = Path(hf_path).expanduser()
    where = f"data.hf_path={redact_text(hf_path)!r}"
    allowed = ("allowed a hub dataset id 'org/name' or a local folder of parquet/jsonl/txt files "
               "(loading scripts and pickles are never run or loaded; use data=text_files for single files)")
    if hf_path.lower().endswith(_UNSAFE_SUFFIXES):
        raise ConfigError(f"{where}: a script or pickle; {allowed}")
    if not local.exists():
        return  # a hub id: `datasets` resolves it to data files (it runs no loading scripts)
    if not local.is_dir():
        raise ConfigError(f"{where}: a file, not a folder; {allowed}")
    unsafe = sorted(str(f.relative_to(local)) for f in local.rglob("*")
                    if f.suffix.lower() in _UNSAFE_SUFFIXES and f.is_file())
    if unsafe:
        raise ConfigError(f"{where}: holds {', '.join(unsafe[:3])}{' ...' if len(unsafe) > 3 else ''}; {allowed}")


def _stream_dataset(cfg):
    """A hub dataset (or a local folder of data files) in streaming mode."""
    import datasets

    if cfg.max_tokens is None:
        raise ConfigError("data.max_tokens=None: allowed an int >= 1 (a streamed corpus needs a token budget)")
    if not cfg.hf_path:
        raise ConfigError("data.hf_path=None: allowed a hub dataset id 'org/name' or a local folder of data files")
    _check_stream_path(str(cfg.hf_path))
    try:
        ds = datasets.load_dataset(cfg.hf_path, name=cfg.hf_name, split=cfg.split, streaming=True,
                                   trust_remote_code=False)
    except Exception as e:  # hub unreachable, unknown repo or config, a loading script
        raise ConfigError(redact_text(
            f"data.hf_path={cfg.hf_path!r}: could not be opened ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")) from e
    return ds, cfg.text_field


def iter_texts(cfg) -> Iterable[str]:
    """Documents of the configured corpus, in a fixed order."""
    if cfg.source == "python_docs":
        return python_docs_texts()
    ds, field = _text_files_dataset(cfg) if cfg.source == "text_files" else _stream_dataset(cfg)
    return (row[field] for row in ds if row.get(field))


def token_stream(texts: Iterable[str], tokenizer, max_tokens) -> np.ndarray:
    """Concatenate documents, each followed by EOS, up to ``max_tokens`` tokens."""
    fast = getattr(tokenizer, "_tokenizer", tokenizer).backend_tokenizer  # Rust tokenizer: no length warnings
    eos = tokenizer.eos_token_id
    chunks, total = [], 0
    for text in texts:
        ids = fast.encode(text, add_special_tokens=False).ids + [eos]
        chunks.append(np.asarray(ids, dtype=np.int32))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    return stream[:max_tokens] if max_tokens is not None else stream


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping blocks of seq_len + 1 tokens; the ragged tail is dropped."""
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def split(blocks: np.ndarray, val_fraction: float, seed: int) -> Corpus:
    """Deterministic train/validation split of whole blocks."""
    order = np.random.default_rng(seed).permutation(len(blocks))
    n_val = max(1, int(round(val_fraction * len(blocks))))
    if n_val >= len(blocks):
        raise ConfigError(f"data.val_fraction={val_fraction}: leaves no training block of {len(blocks)}; "
                          "allowed a smaller data.val_fraction or a larger corpus")
    return Corpus(train=blocks[np.sort(order[n_val:])], val=blocks[np.sort(order[:n_val])])


def load_corpus(data_cfg, tokenizer, seq_len: int) -> Corpus:
    stream = token_stream(iter_texts(data_cfg), tokenizer, data_cfg.max_tokens)
    blocks = pack(stream, seq_len)
    if len(blocks) < 2:
        if data_cfg.max_tokens is not None:
            key = f"data.max_tokens={data_cfg.max_tokens}"
        elif data_cfg.get("paths"):
            key = f"data.paths={list(data_cfg.paths)}"
        else:
            key = f"data={data_cfg.name}"
        raise ConfigError(
            f"{key}: corpus has {len(stream)} tokens, fewer than 2 blocks of train.seq_len+1={seq_len + 1}; "
            "allowed a corpus of at least two sequences (one train, one validation)"
        )
    return split(blocks, data_cfg.val_fraction, data_cfg.split_seed)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Block indices of a training step: epoch-wise permutations, stateless in ``step``."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, pos = divmod(start + len(idx), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch_size - len(idx), n - pos)
        idx.extend(perm[pos : pos + take])
    return np.asarray(idx)


def val_batches(val: np.ndarray, batch_size: int, n_batches: int) -> Iterator[np.ndarray]:
    """A fixed validation subset: the first ``n_batches`` batches of the val blocks."""
    for i in range(0, min(len(val), batch_size * n_batches), batch_size):
        yield val[i : i + batch_size]
