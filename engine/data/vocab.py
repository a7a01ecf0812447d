"""A text vocabulary over fixed word vectors, and its batched codec (the text twin of engine.data.schema).

A sentence is encoded as x [L, E]: the vectors of its tokens, then zero vectors (`<pad>`, vocabulary index 0)
up to L. `TextCodec` is what input-space methods see as `SearchState.codec`: `project` maps every changed
position of x to the nearest vocabulary word (L2, or cosine), so a counterfactual is always a real sentence;
a position is `<pad>` only when its vector is (numerically) zero, so a search never deletes a word by
drifting towards the origin, while a generator's decoded padding stays padding.
"""
from __future__ import annotations

import difflib
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

PAD = "<pad>"
METRICS = ("l2", "cosine")
_CHUNK = 512  # positions per nearest-word block: [512, V] scores stay a few tens of MB
_ZERO = 1e-12  # squared norm under which a vector is padding


class TextVocab:
    """words [V] (index 0 = PAD) and their vectors [V, E] float32 (PAD's is zero); sentences of seq_len tokens."""

    kind = "text"

    def __init__(self, words: Sequence[str], vectors: Union[np.ndarray, torch.Tensor], seq_len: int,
                 metric: str = "l2", candidates: Optional[int] = None) -> None:
        vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if not words or words[0] != PAD:
            raise ValueError(f"text vocabulary: index 0 must be {PAD!r}, got {list(words[:1])}")
        if vectors.dim() != 2 or vectors.shape[0] != len(words):
            raise ValueError(f"text vocabulary: {len(words)} words but vectors of shape {list(vectors.shape)}")
        if bool(vectors[0].abs().sum() != 0):
            raise ValueError(f"text vocabulary: the vector of {PAD!r} must be zero")
        if metric not in METRICS:
            raise ValueError(f"text: option 'metric' must be one of {list(METRICS)}, got {metric!r}")
        self.words, self.vectors, self.seq_len, self.metric = list(words), vectors, int(seq_len), metric
        # words 1..candidates (the most frequent) are what a changed position may become; all decode exactly
        self.candidates = len(words) - 1 if candidates is None else max(1, min(int(candidates), len(words) - 1))
        self.index = {w: i for i, w in enumerate(self.words)}
        self._codecs: dict[str, TextCodec] = {}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_codecs": {}}

    def encode(self, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        """Token lists (every token in the vocabulary, at most seq_len) -> ids [N, seq_len] int64, PAD-filled."""
        ids = torch.zeros((len(sentences), self.seq_len), dtype=torch.int64)
        for i, tokens in enumerate(sentences):
            if len(tokens) > self.seq_len:
                raise ValueError(f"text: sentence {i} has {len(tokens)} tokens, more than seq_len={self.seq_len}")
            ids[i, :len(tokens)] = torch.tensor([self.index[t] for t in tokens], dtype=torch.int64)
        return ids

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [..., L] -> vectors [..., L, E]."""
        return self.vectors[ids]

    def codec(self, device: Union[str, torch.device] = "cpu") -> "TextCodec":
        key = str(torch.device(device))
        if key not in self._codecs:
            self._codecs[key] = TextCodec(self, key)
        return self._codecs[key]

    def tokens(self, x: torch.Tensor) -> list[list[str]]:
        """x [N, L, E] -> each sentence's words (PAD positions dropped)."""
        ids = self.codec("cpu").ids(x.detach().cpu().float())
        return [[self.words[i] for i in row if i != 0] for row in ids.tolist()]

    def result_columns(self, x: torch.Tensor, x_cf: torch.Tensor) -> dict[str, Any]:
        """Results columns of text queries: both sentences (tokens joined by single spaces), the changed words
        as "before -> after" (difflib's alignment, so a shifted sentence is not all changes) and l0 = words
        changed (replaced, inserted or deleted)."""
        before = self.tokens(x)
        after = self.tokens(torch.nan_to_num(x_cf.detach().cpu().float()))
        changes, l0 = [], []
        for a, b in zip(before, after):
            ops = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
            changes.append([f"{' '.join(a[i1:i2]) or '∅'} -> {' '.join(b[j1:j2]) or '∅'}"
                            for _, i1, i2, j1, j2 in ops])
            l0.append(sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in ops))
        return {"text": [" ".join(t) for t in before], "text_cf": [" ".join(t) for t in after],
                "changes": changes, "l0": np.asarray(l0, dtype=np.int64)}


class TextCodec:
    """The vocabulary on one device, for batched nearest-word search over x [..., L, E]."""

    kind = "text"

    def __init__(self, vocab: TextVocab, device: str) -> None:
        self.vocab = vocab
        self.vectors = vocab.vectors.to(device)
        self.seq_len, self.dim = vocab.seq_len, vocab.dim
        norms = self.vectors.norm(dim=1)
        if vocab.metric == "l2":  # argmin ‖x − e‖² = argmax x·e − ‖e‖²/2
            self._weight, self._bias = self.vectors, -0.5 * norms.pow(2)
        else:  # argmax cosine = argmax x·e/‖e‖
            self._weight, self._bias = self.vectors / norms.clamp_min(1e-12)[:, None], torch.zeros_like(norms)
        self._bias = self._bias.clone()
        self._bias[0] = float("-inf")  # PAD only for zero vectors (below)
        self._sq = norms.pow(2)
        # Exact lookup of a word's own vector (sentences as encoded) by a random 1-D projection, O(log V).
        self._proj = torch.randn(self.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        self._keys, self._order = (self.vectors.double() @ self._proj).sort()
        self.n_candidates = vocab.candidates + 1  # PAD and the candidate words lead the vocabulary
        # The interface GC and the searches share with the tabular codec: one "feature" per token position.
        self.n_features = self.seq_len
        self.mutable = torch.ones(self.seq_len, dtype=torch.bool, device=device)
        self.immutable_columns = torch.zeros((self.seq_len, self.dim), dtype=torch.bool, device=device)
        self.width = self.seq_len * self.dim

    def check_width(self, width: int, where: str) -> None:
        if width != self.width:
            raise ValueError(f"{where}: the text vocabulary encodes {self.seq_len} tokens x {self.dim} dims "
                             f"({self.width} values) but the inputs have {width}")

    def nearest(self, flat: torch.Tensor, candidates: bool = False) -> torch.Tensor:
        """[m, E] -> [m] int64 vocabulary ids of the nearest words (PAD for zero vectors only).

        candidates=True: a vector that is exactly a word's keeps it; any other becomes the nearest of the
        vocabulary's candidate words (the most frequent; the data option `candidates`)."""
        flat = flat.to(self._weight.dtype)
        out = torch.empty(len(flat), dtype=torch.int64, device=flat.device)
        for i in range(0, len(flat), _CHUNK):
            block = flat[i:i + _CHUNK]
            scores = block @ self._weight.T + self._bias
            best = scores.argmax(1)
            if candidates and self.n_candidates < len(self._bias):
                exact = (block - self.vectors[best]).pow(2).sum(1) <= 1e-10 * (1 + self._sq[best])
                best = torch.where(exact, best, scores[:, :self.n_candidates].argmax(1))
            out[i:i + _CHUNK] = best
        zero = flat.pow(2).sum(1) < _ZERO
        return torch.where(zero, torch.zeros_like(out), out)

    def ids(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, L, E] -> [n, L] vocabulary ids: a word's own vector by exact lookup, any other the nearest."""
        flat = x.reshape(-1, self.dim)
        pos = torch.searchsorted(self._keys, flat.double() @ self._proj)
        out = torch.full((len(flat),), -1, dtype=torch.int64, device=flat.device)
        for p in (pos.clamp(max=len(self._keys) - 1), (pos - 1).clamp(min=0)):
            word = self._order[p]
            out = torch.where((out < 0) & (self.vectors[word] == flat).all(1), word, out)
        missing = out < 0
        if bool(missing.any()):
            out[missing] = self.nearest(flat[missing])
        return out.view(x.shape[:-1])

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., E] with every position replaced by its nearest candidate word's vector (exact words kept)."""
        return self.vectors[self.nearest(x.reshape(-1, self.dim), candidates=True)].view(x.shape)

    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x [n, L, E] as a real sentence: every position that differs from x0 snapped to its nearest word."""
        x = x.view(len(x), self.seq_len, self.dim)
        changed = (x != x0.view_as(x)).any(-1)
        out = x0.view_as(x).clone()
        if bool(changed.any()):
            out[changed] = self.vectors[self.nearest(x[changed], candidates=True)].to(out.dtype)
        return out

    def token_positions(self, x: torch.Tensor) -> torch.Tensor:
        """[n, L] bool: the positions holding a word (not padding)."""
        return x.view(len(x), self.seq_len, self.dim).pow(2).sum(-1) >= _ZERO

    def expand(self, positions: torch.Tensor) -> torch.Tensor:
        """[n, L] per-position mask -> [n, L, E] (all dimensions of a word at once)."""
        return positions[..., None].expand(*positions.shape, self.dim)

    def feature_sums(self, values: torch.Tensor) -> torch.Tensor:
        """[n, L, E] -> [n, L]: each position's sum over its embedding dimensions."""
        return values.view(len(values), self.seq_len, self.dim).sum(-1)
