"""Training Progressive Exaggeration's explainer I_f for one frozen classifier f (Singla et al. 2020, Eq. 5-9).

Per generator step, with x a batch, c0 = c_f(x, 0) the bin of f(x) and k a uniformly drawn target bin:
    D:   hinge  relu(1 - D(x, c0)) + relu(1 + D(G(E(x), k), k))                       Eq. 7, d_steps times
         (the last one on the generator step's own batch and fakes, detached: one generator pass fewer)
    E,G: λ_cGAN · -D(G(E(x), k), k)                                                    Eq. 8
       + λ_f    · KL(p_k ‖ f(G(E(x), k)))        p_k = centre of bin k = f(x) + δ       Eq. 5 (second term)
       + λ_rec  · (|x - G(E(x), c0)|₁ + |x - G(E(G(E(x), k)), c0)|₁)                   Eq. 5, 6
The ordinal term r(c | x) of L_f (Eq. 4) lives inside D, so the hinge losses train it (Projection GAN, Eq. 3).
f is only queried for outputs and input gradients; its parameters are never updated. f(x) is the
probability of `positive_class`; the KL is between Bernoulli distributions.

Randomness is a function of (seed, step, rank): every step draws its batch and bins from its own generator,
so a run resumed from a checkpoint (weights, optimiser states, step) continues exactly as the uninterrupted
run would. With `workers > 1` the loop runs under Ray Train's TorchTrainer (engine.runtime.explainer_train),
data-parallel: each worker draws batch_size / workers samples and gradients are averaged with an all-reduce
before every optimiser step.
"""
from __future__ import annotations

import hashlib
import io
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from engine.data.base import ArrayDataset
from engine.models.cache import CODE_VERSION, ModelCache, cache_key
from engine.models.explainer import Explainer, ProjectionDiscriminator
from engine.models.training import seeded
from engine.progress import Progress
from engine.store.uri import exists, join, read_bytes, write_bytes_atomic

KIND = "exaggeration"
# Training arguments that place the run but do not change the trained weights (not in the cache key).
RUN_OPTIONS = frozenset({"workers", "use_gpu", "checkpoint_uri", "checkpoint_every"})
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class ExplainerConfig:
    """Everything that determines the trained explainer (part of its cache key). Paper defaults unless noted."""

    num_bins: int = 10          # ⌊1/δ⌋ bins of f(x) ∈ [0, 1] (§2.1; δ = 0.1 in the paper's figures)
    positive_class: int = 1     # f(x) = P(y = positive_class | x); binary tasks explain class 1 vs the rest
    width: int = 16             # base channels of E, G and D (App. A.1's blocks, narrow enough for a CPU)
    disc_width: int = 0         # D's base channels; 0: `width` (not in the paper: a narrower D for a CPU budget)
    levels: int = 0             # E's downsampling stages; 0: down to a code of at most 8x8 (not in the paper)
    skip: bool = False          # U-Net-style shortcut from E's stem to G's last block (not in the paper)
    steps: int = 2000           # generator steps (not in the paper; sized for shapes on 2 CPU cores)
    batch_size: int = 32        # global batch (not in the paper; split across workers)
    lr: float = 2e-4            # Adam learning rate (Miyato & Koyama's projection GAN)
    beta1: float = 0.0          # Adam β1 (Miyato & Koyama)
    beta2: float = 0.9          # Adam β2 (Miyato & Koyama)
    d_steps: int = 5            # discriminator steps per generator step (Miyato & Koyama's n_dis = 5)
    lambda_cgan: float = 1.0    # λ_cGAN (App. A.5 ablation default)
    lambda_f: float = 1.0       # λ_f
    lambda_rec: float = 100.0   # λ_rec, on both L_rec and L_cyc (Eq. 9)

    def __post_init__(self) -> None:
        for name in ("num_bins", "width", "disc_width", "batch_size", "d_steps", "steps", "levels"):
            value = getattr(self, name)
            low = 2 if name == "num_bins" else (0 if name in ("steps", "d_steps", "levels", "disc_width") else 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Expected `explainer.{name}` to be an integer >= {low} but got {value!r}")
        if not isinstance(self.positive_class, int) or self.positive_class < 0:
            raise ValueError(f"Expected `explainer.positive_class` to be an integer >= 0 but got "
                             f"{self.positive_class!r}")
        for name in ("lr", "beta1", "beta2", "lambda_cgan", "lambda_f", "lambda_rec"):  # 3 and 3.0: one cache key
            if isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise ValueError(f"Expected `explainer.{name}` to be > 0 but got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"Expected `explainer.{name}` in [0, 1) but got {getattr(self, name)!r}")
        for name in ("lambda_cgan", "lambda_f", "lambda_rec"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Expected `explainer.{name}` to be >= 0 but got {getattr(self, name)!r}")


def make_explainer_config(params: Optional[dict] = None) -> ExplainerConfig:
    """ExplainerConfig from a dict; unknown keys are a ValueError naming them."""
    known = {f.name for f in fields(ExplainerConfig)}
    params = dict(params or {})
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"Unknown explainer training parameter(s) {unknown}; expected some of {sorted(known)}")
    return ExplainerConfig(**params)


# ---- pure functions: bins, f's Bernoulli output, losses --------------------------------------------------------

def bin_index(p: torch.Tensor, num_bins: int) -> torch.Tensor:
    """c: the bin of probabilities p ∈ [0, 1] among `num_bins` equal bins ([B] float -> [B] int64)."""
    return (p.clamp(0.0, 1.0) * num_bins).long().clamp(max=num_bins - 1)


def bin_centres(num_bins: int, device: Any = None) -> torch.Tensor:
    """[num_bins] centres (k + 0.5) / num_bins: the f(x) + δ that bin k stands for."""
    return (torch.arange(num_bins, device=device, dtype=torch.float32) + 0.5) / num_bins


def positive_log_probs(logits: torch.Tensor, positive: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log f, log(1 - f)) [B] with f = softmax(logits)[:, positive], computed stably in log space."""
    logp = torch.log_softmax(logits.float(), dim=1)
    others = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    others[positive] = False
    return logp[:, positive], torch.logsumexp(logp[:, others], dim=1)


def bernoulli_kl(p: torch.Tensor, log_q: torch.Tensor, log_1mq: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p) ‖ Bern(q)) per row, q given in log space (Eq. 5's D_KL(f(x) + δ ‖ f(x_δ)))."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return p * (p.log() - log_q) + (1 - p) * ((1 - p).log() - log_1mq)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Eq. 7: E[relu(1 - D(x, c0))] + E[relu(1 + D(x_δ, c_δ))]."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def classifier_fingerprint(module: nn.Module) -> str:
    """sha256 of the classifier's parameters and buffers (names, shapes, bytes): the explainer belongs to it."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def classifier_positive_probs(classifier: nn.Module, x: torch.Tensor, positive: int,
                              batch_size: int = 512) -> torch.Tensor:
    """f(x) [N] over a whole split, in chunks."""
    out = [positive_log_probs(classifier(x[i:i + batch_size]), positive)[0].exp() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


# ---- the training loop --------------------------------------------------------------------------------------------

def _step_generator(seed: int, step: int, rank: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((int(seed), int(step), int(rank), salt)) & 0x7FFF_FFFF_FFFF_FFFF)


def _draw(x: torch.Tensor, c0: torch.Tensor, n: int, num_bins: int, g: torch.Generator, device: torch.device):
    idx = torch.randint(0, len(x), (n,), generator=g)
    k = torch.randint(0, num_bins, (n,), generator=g)
    return x[idx].to(device).contiguous(memory_format=torch.channels_last), c0[idx].to(device), k.to(device)


def _average_gradients(params: list[nn.Parameter]) -> None:
    """Data parallelism without DDP's single-forward assumption: all-reduce every gradient (mean)."""
    import torch.distributed as dist  # deferred: only a Ray Train worker (world > 1) needs it

    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return (x - lo) / (hi - lo)


def serialize_checkpoint(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(uri: str) -> Optional[dict]:
    """The checkpoint at `uri`/checkpoint.pt, or None when there is none."""
    path = join(uri, CHECKPOINT_NAME)
    if not exists(path):
        return None
    return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)


def run_training(classifier: nn.Module, x: torch.Tensor, value_range: tuple[float, float], config: ExplainerConfig,
                 *, seed: int = 0, checkpoint_uri: Optional[str] = None, checkpoint_every: int = 200,
                 device: Any = "cpu", rank: int = 0, world_size: int = 1,
                 callback: Optional[Callable[[int, dict], None]] = None,
                 log: Callable[[str], None] = lambda *_: None) -> tuple[Explainer, list[dict]]:
    """The loop of one worker (the only one locally). x [N, C, S, S] is the explainer's training data.

    Returns the explainer in eval mode on the CPU and the history (mean losses per logging interval).
    A checkpoint (weights, optimiser states, step, history) is written every `checkpoint_every` steps and at
    the end by rank 0; an existing one for the same config is resumed from.
    """
    device = torch.device(device)
    cfg = config
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"The explainer needs square images [N, C, S, S] but got {tuple(x.shape)}")
    classifier = classifier.to(device).eval()
    frozen = [p for p in classifier.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    with torch.no_grad():
        k_out = classifier(x[:2].to(device)).shape[1]
    if cfg.positive_class >= k_out:
        raise ValueError(f"explainer.positive_class={cfg.positive_class} but the classifier has {k_out} classes")
    p0 = classifier_positive_probs(classifier, x.to(device), cfg.positive_class).cpu()
    c0_all = bin_index(p0, cfg.num_bins)
    centres = bin_centres(cfg.num_bins, device)
    with seeded(seed):
        explainer = Explainer(x.shape[1], x.shape[2], cfg.num_bins, cfg.width, cfg.positive_class, value_range,
                              cfg.levels, cfg.skip)
        disc = ProjectionDiscriminator(x.shape[1], x.shape[2], cfg.num_bins, cfg.disc_width or cfg.width)
    # channels_last: the CPU convolutions of E, G and D run ~30% faster; the weights are returned contiguous.
    explainer.to(device, memory_format=torch.channels_last).train()
    disc.to(device, memory_format=torch.channels_last).train()
    opt_g = torch.optim.Adam(explainer.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    step, history = 0, []
    ckpt = load_checkpoint(checkpoint_uri) if checkpoint_uri else None
    if ckpt is not None:
        if ckpt.get("config") != asdict(cfg) or ckpt.get("seed") != int(seed):
            raise ValueError(f"checkpoint {join(checkpoint_uri, CHECKPOINT_NAME)!r} belongs to another explainer "
                             f"config or seed; choose another checkpoint_uri or remove it")
        explainer.load_state_dict(ckpt["explainer"])
        disc.load_state_dict(ckpt["disc"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step, history = int(ckpt["step"]), list(ckpt["history"])
        log(f"  explainer: resumed from step {step} ({join(checkpoint_uri, CHECKPOINT_NAME)})")
    per_worker = max(1, cfg.batch_size // world_size)
    sync = world_size > 1
    unit_range = value_range

    def save() -> None:
        if checkpoint_uri and rank == 0:
            state = {"step": step, "config": asdict(cfg), "seed": int(seed), "history": history,
                     "explainer": explainer.state_dict(), "disc": disc.state_dict(),
                     "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}
            write_bytes_atomic(join(checkpoint_uri, CHECKPOINT_NAME), serialize_checkpoint(state))

    def d_step(xb: torch.Tensor, c0: torch.Tensor, fake: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """One hinge step of D (Eq. 7) on real (xb, c0) and fake (fake, k); returns the loss."""
        loss = hinge_d_loss(disc(_unit(xb, unit_range), c0), disc(_unit(fake, unit_range), k))
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        if sync:
            _average_gradients(list(disc.parameters()))
        opt_d.step()
        return loss

    sums: dict[str, float] = {}
    d_loss, counted = torch.zeros(()), 0
    interval = max(1, min(100, cfg.steps // 10 or 1))
    progress = Progress("explainer", log if rank == 0 else None, cfg.steps, done=step)
    try:
        while step < cfg.steps:
            g = _step_generator(seed, step, rank, 0)
            n_dis = cfg.d_steps if cfg.lambda_cgan > 0 else 0
            for _ in range(n_dis - 1):  # extra D steps on fakes of their own
                xb, c0, k = _draw(x, c0_all, per_worker, cfg.num_bins, g, device)
                with torch.no_grad():
                    fake = explainer(xb, k)
                d_loss = d_step(xb, c0, fake, k)
            xb, c0, k = _draw(x, c0_all, per_worker, cfg.num_bins, g, device)
            codes = explainer.encode(xb)
            # One decoder pass for both conditions: BN statistics mix the two, as at inference over a series.
            both = explainer.decode([torch.cat([t, t]) for t in codes], torch.cat([k, c0]))
            fake, rec = both[:per_worker], both[per_worker:]
            if n_dis:  # the last D step sees this G step's fakes (no second generator pass)
                d_loss = d_step(xb, c0, fake.detach(), k)
            cyc = explainer(fake, c0)
            if cfg.lambda_cgan > 0:
                for p in disc.parameters():
                    p.requires_grad_(False)
                adv = -disc(_unit(fake, unit_range), k).mean()
                for p in disc.parameters():
                    p.requires_grad_(True)
            else:  # the ablation without the adversarial term (App. A.5): D is not needed
                adv = fake.new_zeros(())
            log_q, log_1mq = positive_log_probs(classifier(fake), cfg.positive_class)
            kl = bernoulli_kl(centres[k], log_q, log_1mq).mean()
            l_rec, l_cyc = (rec - xb).abs().mean(), (cyc - xb).abs().mean()
            g_loss = cfg.lambda_cgan * adv + cfg.lambda_f * kl + cfg.lambda_rec * (l_rec + l_cyc)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            if sync:
                _average_gradients(list(explainer.parameters()))
            opt_g.step()
            step += 1
            d_value = d_loss.item() if cfg.lambda_cgan > 0 and cfg.d_steps else 0.0
            values = {"d": d_value, "adv": adv.item(), "kl": kl.item(), "rec": l_rec.item(), "cyc": l_cyc.item()}
            if not all(v == v and abs(v) != float("inf") for v in values.values()):
                raise FloatingPointError(f"explainer training diverged at step {step}: {values}")
            for key, v in values.items():
                sums[key] = sums.get(key, 0.0) + v
            counted += 1
            shown: dict[str, float] = {}  # the progress line's figures: the last logging interval's means
            if step % interval == 0 or step == cfg.steps:
                n, counted = counted, 0
                history.append({"step": step, **{key: v / n for key, v in sums.items()}})
                sums = {}
                shown = {key: v for key, v in history[-1].items() if key != "step"}
            progress.update(1, **shown)
            if callback is not None:
                callback(step, values)
            if checkpoint_uri and step % checkpoint_every == 0:
                save()
        if checkpoint_uri and (ckpt is None or int(ckpt["step"]) != step):
            save()
        progress.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return explainer.cpu().to(memory_format=torch.contiguous_format).eval(), history


def train_explainer(classifier: nn.Module, dataset: ArrayDataset, config: ExplainerConfig, *, seed: int = 0,
                    checkpoint_uri: Optional[str] = None, checkpoint_every: int = 200, workers: int = 1,
                    use_gpu: bool = False, device: Any = "cpu", callback: Optional[Callable[[int, dict], None]] = None,
                    log: Callable[[str], None] = lambda *_: None) -> tuple[Explainer, list[dict]]:
    """Train I_f on `dataset` (its images, value range) for `classifier` in this process (workers 1)."""
    value_range = check_images(dataset)
    if workers > 1:  # the workflows pass train=engine.runtime.explainer_train.train_explainer
        raise ValueError(f"workers={workers} trains on Ray Train (engine.runtime.explainer_train.train_explainer)")
    return run_training(classifier, dataset.x.float(), value_range, config, seed=seed,
                        checkpoint_uri=checkpoint_uri, checkpoint_every=checkpoint_every, device=device,
                        callback=callback, log=log)


def check_images(dataset: ArrayDataset) -> tuple[float, float]:
    """The dataset's value range; a ValueError unless its samples are images [C, S, S]."""
    if dataset.kind != "image" or len(dataset.input_shape) != 3:
        raise ValueError(f"Progressive exaggeration trains on images but dataset {dataset.name!r} has samples of "
                         f"shape {dataset.input_shape}")
    return tuple(float(v) for v in dataset.value_range)


def explainer_cache_key(classifier_fp: str, dataset_fp: str, config: ExplainerConfig, seed: int,
                        hparams: dict) -> str:
    return cache_key(KIND, "explainer", hparams, {**asdict(config), "classifier": classifier_fp}, seed, dataset_fp)


def get_or_train_explainer(classifier: nn.Module, dataset: ArrayDataset, dataset_fp: str, config: ExplainerConfig,
                           *, seed: int = 0, cache_dir: Any = None, checkpoint_uri: Optional[str] = None,
                           checkpoint_every: int = 200, workers: int = 1, use_gpu: bool = False,
                           device: Any = "cpu", log: Callable[[str], None] = lambda *_: None,
                           train: Optional[Callable[..., tuple[Explainer, list[dict]]]] = None
                           ) -> tuple[Explainer, dict]:
    """The trained explainer for (classifier weights, data, config, seed): from the model cache or trained now,
    by `train` (train_explainer's signature; default: this process's train_explainer).

    info: key, cache_hit, path, seconds, train_seconds, history, classifier_fingerprint.
    """
    start = time.perf_counter()
    cfp = classifier_fingerprint(classifier)
    value_range = tuple(float(v) for v in dataset.value_range)
    shape = dataset.input_shape
    if len(shape) != 3:
        raise ValueError(f"Progressive exaggeration trains on images but dataset {dataset.name!r} has samples of "
                         f"shape {shape}")
    hparams = dict(in_channels=int(shape[0]), image_size=int(shape[1]), num_bins=config.num_bins, width=config.width,
                   positive_class=config.positive_class, value_range=list(value_range), levels=config.levels,
                   skip=config.skip)
    key = explainer_cache_key(cfp, dataset_fp, config, seed, hparams)
    cache = ModelCache(cache_dir)
    hit = cache.load(key)
    if hit is not None:
        state, meta = hit
        explainer = Explainer(**{**meta["arch_kwargs"], "value_range": tuple(meta["arch_kwargs"]["value_range"])})
        explainer.load_state_dict(state)
        explainer.eval()
        history, train_seconds = meta.get("history", []), meta.get("train_seconds")
    else:
        t0 = time.perf_counter()
        explainer, history = (train or train_explainer)(
            classifier, dataset, config, seed=seed, checkpoint_uri=checkpoint_uri, checkpoint_every=checkpoint_every,
            workers=workers, use_gpu=use_gpu, device=device, log=log)
        train_seconds = time.perf_counter() - t0
        meta = {"key": key, "kind": KIND, "arch": "explainer", "arch_kwargs": explainer.hparams,
                "train_kwargs": asdict(config), "seed": int(seed), "classifier_fingerprint": cfp,
                "dataset_fingerprint": str(dataset_fp), "dataset_name": dataset.name, "num_samples": len(dataset),
                "history": history, "train_seconds": train_seconds, "workers": int(workers),
                "created": datetime.now(timezone.utc).isoformat(), "code_version": CODE_VERSION,
                "torch_version": torch.__version__}
        cache.save(key, explainer.state_dict(), meta)
    for p in explainer.parameters():
        p.requires_grad_(False)
    explainer.meta = {"cache_key": key, "classifier_fingerprint": cfp}
    info = {"key": key, "cache_hit": hit is not None, "path": str(cache.path(key)),
            "seconds": time.perf_counter() - start, "train_seconds": train_seconds, "history": list(history),
            "classifier_fingerprint": cfp}
    return explainer, info
