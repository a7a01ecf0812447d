"""Text counterfactuals on held-out Rotten Tomatoes sentences (issue 13): the figures and example pairs.

    python -m jobs.text_eval [SPEC] [--gc-queries 500] [--aip-queries 200] [--examples 5] [--json OUT.json]

SPEC (default jobs/specs/text.yaml) names the data, the CNN, the text VAE and the methods' parameters; models
come from the model cache (or are trained, as `cfaudit audit` would). Prints the classifier's held-out accuracy;
for Gradual Construction with Eq. 7 and with Eq. 12 (`loss: target_probability`): flip ratio, words changed,
and how often an inserted word has the target's VADER polarity against chance; for AIP: flip ratio and LPR with
k = latent size; a few sentence pairs per method. See engine.workflows.text_eval.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.spec import AuditSpec, load_spec
from engine.workflows.text_eval import text_figures

DEFAULT_SPEC = Path(__file__).parent / "specs" / "text.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.text_eval", description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC))
    parser.add_argument("--gc-queries", type=int, default=500, help="held-out queries for Gradual Construction")
    parser.add_argument("--aip-queries", type=int, default=200, help="held-out queries for AIP")
    parser.add_argument("--examples", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write every figure and example to this file")
    args = parser.parse_args(argv)
    spec = load_spec(AuditSpec, args.spec)
    figures = text_figures(spec, args.gc_queries, args.aip_queries, args.examples)
    print(f"\nclassifier accuracy on {figures['test_sentences']} held-out sentences: {figures['accuracy']:.3f}")
    for key, title in (("gc", "Gradual Construction, Eq. 7"), ("gc_eq12", "Gradual Construction, Eq. 12 (w/o LD)")):
        f = figures[key]
        print(f"{title}: {f['queries']} queries, flip ratio {f['flip_ratio']:.3f}, words changed "
              f"{f['words_changed']:.2f} (max {f['words_changed_max']}), inserted words of the target polarity "
              f"{f['polarity_rate']:.3f} (chance {f['polarity_chance']:.3f}, {f['inserted']} words), "
              f"{f['cpu_seconds']:.0f} CPU s")
    if "aip" in figures:
        f = figures["aip"]
        print(f"AIP: {f['queries']} queries, flip ratio {f['flip_ratio']:.3f}, LPR (k = {f['latent_size']}) "
              f"{f['lpr_z']:.3f}, results column lpr (z ⊕ a) {f['lpr_column']:.3f}, {f['cpu_seconds']:.0f} CPU s; "
              f"query words kept at their position: reconstruction G(E(x)) {f['reconstruction']:.3f}, "
              f"counterfactuals {f['kept']:.3f}")
    for key in ("gc_examples", "gc_eq12_examples", "aip_examples"):
        for e in figures.get(key, []):
            print(f"[{key[:-9]}] {'valid' if e['success'] else 'not valid'} -> class {e['target']}\n"
                  f"    {e['text']}\n    {e['text_cf']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
