"""The text VAE's building blocks on random vectors (no text packages needed): the GRU encoder reads a sentence
up to its first <pad> only (training slices batches to their longest sentence, so this must hold exactly),
length batching visits every sentence once, greedy decoding is causal (a shorter decoding is a prefix), and
both encoder/output-layer variants build and decode to vocabulary vectors."""
import pytest
import torch

from engine.models.text_models import TextVAE, _length_batches
from engine.models.training import seeded
from engine.workflows.text_eval import positional_match

L, E, V = 12, 8, 50


def _vae(**kw) -> TextVAE:
    with seeded(0):
        m = TextVAE(L, E, V, 1, latent_dim=6, hidden=16, filters=8, out_vocab=V, **kw)
        vectors = torch.randn(V, E)
    vectors[0] = 0  # <pad>
    m.set_vectors(vectors)
    return m.eval()


def _sentences(lengths: list[int]) -> torch.Tensor:
    with seeded(1):
        ids = torch.randint(1, V, (len(lengths), L))
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    return ids


def test_gru_encoder_ignores_the_padding_after_the_sentence():
    m = _vae(encoder="gru")
    ids = _sentences([3, 7, 5])
    x = m.vectors[ids]
    with torch.no_grad():
        full, cut = m.encode_stats(x), m.encode_stats(x[:, :8])
    for a, b in zip(full, cut):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # a word inside the sentence does change the code
        other = x.clone()
        other[0, 1] = m.vectors[(ids[0, 1] % (V - 1)) + 1]
        assert not torch.allclose(m.encode_stats(other)[0][0], full[0][0])


def test_length_batches_cover_every_sentence_once_and_group_similar_lengths():
    lengths = torch.randint(1, 40, (1000,))
    batches = list(_length_batches(lengths, 64))
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    spans = [int(lengths[b].max() - lengths[b].min()) for b in batches]
    assert max(spans) <= 3  # sorted by length: a batch spans a few lengths, not the whole range
    with pytest.raises(ValueError, match="batch_size >= 1"):
        next(_length_batches(lengths, 0))


@pytest.mark.parametrize("encoder,tied", [("gru", False), ("conv", True)])
def test_decoding_is_causal_and_emits_vocabulary_vectors(encoder, tied):
    m = _vae(encoder=encoder, tied=tied)
    x = m.vectors[_sentences([4, 9])]
    with torch.no_grad():
        z, a = m.encode(x)
        full, short = m.decode(z, a), m.decode(z, a, steps=5)
    assert full.shape == (2, L, E) and short.shape == (2, 5, E)
    torch.testing.assert_close(short, full[:, :5])
    exact = (full.reshape(-1, 1, E) == m.vectors[None]).all(-1).any(-1)
    assert bool(exact.all())  # every position is exactly a vocabulary vector (or <pad>, the zero vector)
    assert m.hparams["encoder"] == encoder and m.hparams["tied"] == tied


def test_text_vae_rejects_an_unknown_encoder():
    with pytest.raises(ValueError, match="encoder must be 'conv' or 'gru'"):
        TextVAE(L, E, V, encoder="lstm")


def test_positional_match_counts_query_words_kept_in_place():
    q = [["a", "good", "film"], ["bad"]]
    assert positional_match(q, [["a", "bad", "film"], ["bad", "x"]]) == pytest.approx(3 / 4)
    assert positional_match(q, [["film", "a"], []]) == 0.0
    assert positional_match([], []) == 0.0
