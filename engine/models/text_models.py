"""Built-in text models over fixed word vectors x [B, L, E] (engine.data.text).

TextCNN: Kim (2014) "CNN-static", the classifier both Gradual Construction (§4.2) and AIP (§4.1.2) explain:
the GloVe vectors are the input, so they stay frozen by construction and GC can edit them.
TextVAE: a sentence VAE with an attribute code, latent z ⊕ a (Bowman et al. 2016; Hu et al. 2017, the
model AIP §4.1.3 builds on; k = 256 as AIP §4.2.1): a bidirectional GRU encoder over the words (or the older
max-pooled convolutions, `encoder="conv"`), a GRU decoder with a free output layer over the `out_vocab` most
frequent words (or one tied to their frozen vectors, `tied=True`), and greedy decoding that emits real word
vectors (straight-through: the word's vector forward, the softmax's gradient backward), so a decoded latent is a
sentence the classifier can judge and AIP can differentiate through. `train_text_vae` fits it (ELBO with a small,
annealed KL weight and word dropout, the attribute head, and AIP Eq. 4's discrimination term through a frozen
sentiment CNN, weighted against the reconstruction summed over a sentence's words).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from engine.data.base import ArrayDataset
from engine.models.training import attribute_targets, finish, seeded, train_classifier
from engine.progress import Log, Progress


class TextCNN(nn.Module):
    """x [B, L, E] -> logits [B, num_classes]: convolutions of each width over time, ReLU, max over time,
    dropout (Kim: 0.5), one linear layer. L must be at least the widest filter (the data pads to 5 tokens)."""

    def __init__(self, embed_dim: int, num_classes: int, filters: int = 100, widths: Sequence[int] = (3, 4, 5),
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.hparams = dict(embed_dim=int(embed_dim), num_classes=int(num_classes), filters=int(filters),
                            widths=[int(w) for w in widths], dropout=float(dropout))
        self.convs = nn.ModuleList(nn.Conv1d(int(embed_dim), int(filters), int(w)) for w in widths)
        self.drop = nn.Dropout(float(dropout))
        self.fc = nn.Linear(int(filters) * len(self.convs), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)
        return self.fc(self.drop(torch.cat([F.relu(conv(h)).amax(-1) for conv in self.convs], 1)))


class TextVAE(nn.Module):
    """encode(x [B, L, E]) -> (z = μ [B, k], a = sigmoid(attribute logits) [B, t]); decode(z, a) -> [B, L, E]."""

    def __init__(self, seq_len: int, embed_dim: int, vocab_size: int, num_attributes: int = 1, latent_dim: int = 256,
                 hidden: int = 256, filters: int = 128, out_vocab: int = 5000, temperature: float = 1.0,
                 encoder: str = "gru", tied: bool = False) -> None:
        super().__init__()
        if num_attributes < 1:
            raise ValueError(f"TextVAE needs num_attributes >= 1 (the dataset's attribute code), got {num_attributes}")
        if encoder not in ("conv", "gru"):
            raise ValueError(f"TextVAE encoder must be 'conv' or 'gru', got {encoder!r}")
        out_vocab = min(int(out_vocab), int(vocab_size))
        self.hparams = dict(seq_len=int(seq_len), embed_dim=int(embed_dim), vocab_size=int(vocab_size),
                            num_attributes=int(num_attributes), latent_dim=int(latent_dim), hidden=int(hidden),
                            filters=int(filters), out_vocab=out_vocab, temperature=float(temperature),
                            encoder=str(encoder), tied=bool(tied))
        self.latent_dim, self.seq_len, self.temperature = int(latent_dim), int(seq_len), float(temperature)
        code = int(latent_dim) + int(num_attributes)
        if encoder == "conv":
            self.enc_convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, w, padding=w // 2) for w in (2, 3, 4))
            self.enc_fc = nn.Linear(3 * filters, 2 * int(latent_dim) + int(num_attributes))
        else:
            self.enc_gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
            self.enc_fc = nn.Linear(2 * hidden, 2 * int(latent_dim) + int(num_attributes))
        self.register_buffer("vectors", torch.zeros(int(vocab_size), int(embed_dim)))  # set from the data
        self.bos = nn.Parameter(torch.zeros(int(embed_dim)))
        self.init = nn.Linear(code, hidden)
        self.gru = nn.GRU(embed_dim + code, hidden, batch_first=True)
        if tied:
            self.out = nn.Linear(hidden, embed_dim)
            self.out_bias = nn.Parameter(torch.zeros(out_vocab))
        else:
            self.out = nn.Linear(hidden, out_vocab)

    def set_vectors(self, vectors: torch.Tensor) -> None:
        if tuple(vectors.shape) != tuple(self.vectors.shape):
            raise ValueError(f"TextVAE: vocabulary vectors of shape {list(vectors.shape)}, expected "
                             f"{list(self.vectors.shape)}")
        self.vectors.copy_(vectors)

    @property
    def out_vectors(self) -> torch.Tensor:
        return self.vectors[: self.hparams["out_vocab"]]

    def encode_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, E] -> μ, log σ² [B, k] and attribute logits [B, t]."""
        if self.hparams["encoder"] == "conv":
            h = x.transpose(1, 2)
            feats = torch.cat([F.relu(conv(h)).amax(-1) for conv in self.enc_convs], 1)
        else:  # the final states of both directions over the words (positions up to the first <pad>)
            lengths = sentence_lengths(x).clamp_min(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, last = self.enc_gru(packed)
            feats = torch.cat([last[0], last[1]], 1)
        out = self.enc_fc(feats)
        k = self.latent_dim
        return out[:, :k], out[:, k:2 * k].clamp(-10, 10), out[:, 2 * k:]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, _, a_logits = self.encode_stats(x)
        return mu, torch.sigmoid(a_logits)

    def word_logits(self, h: torch.Tensor) -> torch.Tensor:
        """GRU states [..., H] -> scores over the output vocabulary [..., V_out] (tied to the word vectors)."""
        if not self.hparams["tied"]:
            return self.out(h)
        return self.out(h) @ self.out_vectors.T + self.out_bias

    def teacher_forced(self, code: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Training pass: code [B, k + t], inputs [B, L, E] (BOS then the words) -> logits [B, L, V_out]."""
        h0 = torch.tanh(self.init(code))[None]
        steps = torch.cat([inputs, code[:, None].expand(-1, inputs.shape[1], -1)], 2)
        states, _ = self.gru(steps, h0)
        return self.word_logits(states)

    def decode(self, z: torch.Tensor, a: Optional[torch.Tensor] = None, soft: bool = False,
               steps: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding -> word vectors [B, L, E]: the argmax word at each step (its vector forward, the
        softmax's expected vector in the gradient); after the first `<pad>` every position is padding.
        soft=True returns the expected vectors themselves (the discrimination term's relaxation); `steps` (default
        the model's sequence length) shortens the decoding."""
        if a is None:
            a = torch.zeros(len(z), self.hparams["num_attributes"], device=z.device, dtype=z.dtype)
        code = torch.cat([z, a], 1)
        h = torch.tanh(self.init(code))[None]
        table = self.out_vectors
        word = self.bos.expand(len(z), -1)
        alive = torch.ones(len(z), 1, device=z.device, dtype=z.dtype)
        out = []
        for _ in range(self.seq_len if steps is None else int(steps)):
            state, h = self.gru(torch.cat([word, code], 1)[:, None], h)
            p = torch.softmax(self.word_logits(state[:, 0]) / self.temperature, -1)
            if soft:
                word = p @ table
            else:
                hard = F.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
                word = hard @ table + (p - p.detach()) @ table  # exactly the word forward, softmax backward
                alive = alive * (1 - hard[:, :1]).detach()  # index 0 is <pad>: the sentence has ended
                word = word * alive
            out.append(word)
        return torch.stack(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))


def output_targets(vocab_vectors: torch.Tensor, out_vocab: int) -> torch.Tensor:
    """[V] int64: each word's training target among the first `out_vocab` words (itself if it is one, else the
    nearest of them by cosine), so rare words are taught as a frequent neighbour instead of an unknown token."""
    v = vocab_vectors / vocab_vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    target = torch.arange(len(v))
    rare = torch.arange(out_vocab, len(v))
    for i in range(0, len(rare), 2048):
        block = rare[i:i + 2048]
        target[block] = (v[block] @ v[1:out_vocab].T).argmax(1) + 1  # never <pad>
    return target


def sentence_lengths(x: torch.Tensor) -> torch.Tensor:
    """x [B, L, E] -> [B] int64: the words before the first `<pad>` (zero vector)."""
    return (x.abs().sum(-1) > 0).long().cumprod(1).sum(1)


def _length_batches(lengths: torch.Tensor, batch_size: int):
    """Batches of sentences of similar length (sorted with random tie-breaking, then the batches shuffled), so
    a batch runs the recurrent layers only over its longest sentence."""
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1 but got {batch_size}")
    order = torch.argsort(lengths.float() + torch.rand(len(lengths)) * 0.5)
    batches = list(torch.split(order, batch_size))
    for i in torch.randperm(len(batches)).tolist():
        yield batches[i]


def train_text_vae(module: TextVAE, dataset: ArrayDataset, *, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3,
                   kl_weight: float = 0.01, kl_warmup: int = 3, word_dropout: float = 0.5, disc_weight: float = 1.0,
                   free_bits: float = 0.0,
                   oracle_epochs: int = 4, seed: int = 0,
                   oracle: Optional[nn.Module] = None, log: Log = None,
                   stage: str = "text_vae") -> tuple[nn.Module, list[float]]:
    """Per batch: CE of the teacher-forced words up to the first <pad> (summed over positions, mean over
    sentences) + β·KL(q(z|x) ‖ N(0, I)) with β rising linearly to `kl_weight` over `kl_warmup` epochs + BCE of
    the attribute head + `disc_weight`·CE(D(decode_soft(z, a′)), a′) with a′ the batch's attributes shuffled
    (AIP Eq. 4; D a TextCNN fitted beforehand and frozen, or `oracle`). Inputs are dropped to <pad> with
    probability `word_dropout` so the decoder has to use the code (Bowman et al.). Batches hold sentences of
    similar length and run only up to their longest. Defaults are the measured configuration (README, Text);
    a `disc_weight` of 20 makes the code decide the classifier's verdict but lets the decoder fool D with repeated
    sentiment words ("excellent excellent ..."), so the default stays 1. `log` gets throttled progress lines."""
    if getattr(dataset, "kind", None) != "text" or getattr(dataset, "schema", None) is None:
        raise ValueError(f"TextVAE trains on a `text` dataset (word vectors and vocabulary); {dataset.name!r} is "
                         f"{getattr(dataset, 'kind', '?')!r}")
    vocab = dataset.schema
    module.set_vectors(vocab.vectors)
    a_all = attribute_targets(dataset, module)
    x_all = dataset.x.float()
    ids_all = vocab.codec("cpu").ids(x_all)
    targets = output_targets(vocab.vectors, module.hparams["out_vocab"])[ids_all]  # [N, L]
    lengths = sentence_lengths(x_all)
    if oracle is None and disc_weight > 0:
        with seeded(seed + 1):
            oracle = TextCNN(vocab.dim, dataset.num_classes)
        oracle, _ = train_classifier(oracle, dataset, epochs=oracle_epochs, batch_size=batch_size, seed=seed + 1,
                                     log=log, stage=f"{stage} oracle")
    frozen = [] if oracle is None else [p for p in oracle.eval().parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history: list[float] = []
    steps_per_epoch = -(-len(x_all) // batch_size)
    progress = Progress(stage, log, epochs * steps_per_epoch, epochs=epochs)
    try:
        with seeded(seed):
            opt = torch.optim.Adam(module.parameters(), lr=lr)
            module.train()
            for epoch in range(epochs):
                total, seen = 0.0, 0
                for b, idx in enumerate(_length_batches(lengths, batch_size)):
                    width = int(lengths[idx].max()) + 1  # the words and the first <pad>: nothing after is scored
                    x, a, tgt = x_all[idx, :width], a_all[idx], targets[idx, :width]
                    mu, logvar, a_logits = module.encode_stats(x)
                    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                    keep = (torch.rand(x.shape[:2]) >= word_dropout).float()[..., None]
                    inputs = torch.cat([module.bos.expand(len(x), 1, -1), (x * keep)[:, :-1]], 1)
                    logits = module.teacher_forced(torch.cat([z, a], 1), inputs)
                    # positions up to and including the first <pad> (the end of the sentence) are predicted
                    live = torch.arange(tgt.shape[1])[None] <= lengths[idx][:, None]
                    rec = F.cross_entropy(logits[live], tgt[live], reduction="sum") / len(idx)
                    kl_dims = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean(0)  # [k], batch mean
                    kl = kl_dims.clamp_min(free_bits).sum()
                    beta = kl_weight * min(1.0, (epoch * steps_per_epoch + b + 1) / max(1, kl_warmup * steps_per_epoch))
                    loss = rec + beta * kl + F.binary_cross_entropy_with_logits(a_logits, a)
                    if oracle is not None and disc_weight > 0:
                        a_prime = a[torch.randperm(len(idx))]
                        fake = module.decode(z, a_prime, soft=True, steps=max(width, 5))
                        loss = loss + disc_weight * F.cross_entropy(oracle(fake), a_prime[:, 0].long())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, seen = total + loss.item() * len(idx), seen + len(idx)
                    progress.update(loss=total / seen)
                history.append(total / len(x_all))
        progress.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return finish(module, history)
