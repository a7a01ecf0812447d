"""`python -m jobs.fid --dataset fashion_mnist --n 500 [--extractor auto|inception|domain] [--noise 0.1]`

A sanity check of the FID pipeline on real data: with A = test images [0, n), B = test images [n, 2n) and
B' = B plus Gaussian noise (sigma `--noise`, clamped to the value range), FID(A, B) must be far below
FID(A, B'). Prints both figures with the feature extractor and the sample counts behind them.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from engine.data import load_dataset
from engine.metrics.features import fid_extractor
from engine.metrics.frechet import FrechetState, frechet_record


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.fid", description=__doc__.split("\n\n")[1])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--n", type=int, default=500, help="images per set (the test split needs 2n)")
    parser.add_argument("--extractor", default="auto", choices=["auto", "inception", "domain"])
    parser.add_argument("--weights", help="Inception weights file (default: $CFAUDIT_INCEPTION_WEIGHTS, then "
                                          "pytorch-fid's torch hub cache file)")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the Gaussian noise on the copies")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 2:
        parser.error(f"--n must be >= 2 (a covariance needs 2 samples), got {args.n}")

    start = time.perf_counter()
    test = load_dataset(args.dataset, "test")
    if len(test) < 2 * args.n:
        parser.error(f"{args.dataset} test split has {len(test)} images; --n {args.n} needs {2 * args.n}")
    lo, hi = test.value_range
    a, b = test.x[:args.n], test.x[args.n:2 * args.n]
    g = torch.Generator().manual_seed(args.seed)
    noisy = (b + args.noise * (hi - lo) * torch.randn(b.shape, generator=g)).clamp(lo, hi)

    extractor = fid_extractor(args.extractor, args.weights, dataset_name=args.dataset, device=args.device)
    t0 = time.perf_counter()
    sa, sb, sn = (FrechetState.of(extractor(x)) for x in (a, b, noisy))
    feature_seconds = time.perf_counter() - t0
    rows = [(f"test[0:{args.n}] vs test[{args.n}:{2 * args.n}]", frechet_record(sa, sb, extractor.name)),
            (f"test[0:{args.n}] vs test[{args.n}:{2 * args.n}] + N(0, {args.noise:g}²) noise",
             frechet_record(sa, sn, extractor.name))]
    for what, r in rows:
        print(f"FID = {r['fid']:10.4f}   {what}   [extractor {r['extractor']}, {r['dim']}-d features, "
              f"n = {r['n_a']} vs {r['n_b']}]")
    print(f"features of {3 * args.n} images in {feature_seconds:.1f}s; total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
