"""Sentiment polarity of the words a text counterfactual inserts, read from VADER's lexicon.

Gradual Construction §5.1 (Table 7) argues that Eq. 7's logit statistics make the inserted word "highly
related to the target class" where Eq. 12 inserts irrelevant ones (an actor's name). This module measures
it: the share of inserted words whose lexicon valence has the target's sign, against chance, the share of
the substitution candidates that do. The lexicon is `vader_lexicon.txt` from the vaderSentiment wheel
(Hutto & Gilbert 2014, MIT; 7,500 tokens rated −4..+4 by ten raters, mean given), read as a file.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Optional, Sequence

import torch

LEXICON_FILE = "vader_lexicon.txt"


def lexicon_path(path: Optional[str] = None) -> Path:
    if path is None:
        spec = importlib.util.find_spec("vaderSentiment")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("polarity: the VADER lexicon needs the vaderSentiment package; pip install vaderSentiment "
                             "(or `pip install cfaudit[text]`)")
        path = str(Path(list(spec.submodule_search_locations)[0]) / LEXICON_FILE)
    if not Path(path).is_file():
        raise ValueError(f"polarity: lexicon file {path} does not exist")
    return Path(path)


@functools.lru_cache(maxsize=2)
def vader_lexicon(path: Optional[str] = None) -> dict[str, float]:
    """token -> mean valence (−4..+4) from VADER's tab-separated lexicon (token, mean, sd, ratings)."""
    out: dict[str, float] = {}
    source = lexicon_path(path)
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        try:
            out[parts[0]] = float(parts[1])
        except ValueError:
            raise ValueError(f"polarity: {source} line {n}: expected a token and a number, got {line[:60]!r}") from None
    return out


def word_swaps(vocab, x: torch.Tensor, x_cf: torch.Tensor) -> list[list[tuple[str, str]]]:
    """Per query, (before, after) for every token position whose word changed, x and x_cf [B, L, E]."""
    codec = vocab.codec("cpu")
    a, b = codec.ids(x.detach().cpu().float()), codec.ids(torch.nan_to_num(x_cf.detach().cpu().float()))
    return [[(vocab.words[i], vocab.words[j]) for i, j in zip(ra, rb) if i != j]
            for ra, rb in zip(a.tolist(), b.tolist())]


def sign_of(word: str, lexicon: dict[str, float]) -> int:
    """+1 / −1 for a word with positive / negative valence, 0 for a neutral or unlisted one."""
    v = lexicon.get(word, 0.0)
    return (v > 0) - (v < 0)


def polarity_rate(inserted: Sequence[tuple[str, int]], lexicon: dict[str, float]) -> float:
    """Share of (word, target sign) pairs whose word has the target's polarity; NaN for none."""
    if not inserted:
        return float("nan")
    return sum(sign_of(w, lexicon) == s for w, s in inserted) / len(inserted)


def chance_rate(candidates: Sequence[str], signs: Sequence[int], lexicon: dict[str, float]) -> float:
    """What a uniform draw from `candidates` would score: mean over the targets' signs of the share of
    candidate words with that polarity."""
    if not candidates or not signs:
        return float("nan")
    share = {s: sum(sign_of(w, lexicon) == s for w in candidates) / len(candidates) for s in set(signs)}
    return sum(share[s] for s in signs) / len(signs)
