"""Which layer of the layered default costs AUPRC or lets the feature trigger through on fraud-synth.

    python benchmarks/fraud_layers.py --seed 0 --attacks clean feature_trigger minmax

Runs benchmarks/fraud.py's federation (same data, model, training, one bank of 8 attacking) with
the layered default and with one layer removed or swapped at a time, and prints per run: AUPRC
(mean of the last 3 rounds), the feature trigger's ASR, the mean share of its norm that ``clip``
left to the attacker's row and to the largest bank's row, and the client-rounds the reputation
layer quarantined (attacker, honest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fraud  # noqa: E402

VALIDATE, CLIP = {"validate": {"check_norms": False}}, {"clip": {"max_norm": "auto"}}
VARIANTS = {
    "mean": ["mean"],
    "layered": fraud.LAYERED,
    "no_reputation": [VALIDATE, CLIP, "trimmed_mean"],
    "no_clip": [VALIDATE, "trimmed_mean", "reputation"],
    "weighted_mean": [VALIDATE, CLIP, "mean", "reputation"],  # FedAvg's row-weighted mean for the trimmed mean
    "clip_mean": [VALIDATE, CLIP, "mean"],
}


def run(attack: str, variant: str, seed: int) -> dict:
    import torch

    from phalanx.config import parse_config
    from phalanx.federation import Federation

    torch.set_num_threads(1)
    fraud.DEFENSES[variant] = VARIANTS[variant]
    fed = Federation(parse_config(fraud.config("fraud-synth", attack, variant, seed)))
    big = max(range(len(fed.parts)), key=lambda k: len(fed.parts[k]))
    auprc, asr, kept_mal, kept_big, q_mal, q_honest = [], [], [], [], 0, 0
    for rnd in range(fraud.FED["rounds"]):
        r = fed.run_round(rnd)
        auprc.append(r.metrics.get("auprc"))
        asr.append(r.metrics.get("asr"))
        attacked = [c["malicious"] and attack != "clean" for c in r.clients]
        for c, bad in zip(r.clients, attacked):
            if any(f.endswith("quarantined") for f in c["flags"]):
                q_mal += bad
                q_honest += not bad
        for rep in r.report.info.get("reports", []):
            if rep.name == "clip":
                kept = [min(1.0, rep.info["norm_bound"] / max(float(s), 1e-12)) for s in rep.scores]
                kept_mal += [k for k, bad in zip(kept, attacked) if bad]
                kept_big.append(kept[big])
    tail = [v for v in asr[-fraud.LAST:] if v is not None]
    return {"auprc": statistics.fmean(v for v in auprc[-fraud.LAST:] if v is not None),
            "asr": statistics.fmean(tail) if tail and attack == "feature_trigger" else None,
            "kept_mal": statistics.fmean(kept_mal) if kept_mal else None,
            "kept_big": statistics.fmean(kept_big) if kept_big else None, "q_mal": q_mal, "q_honest": q_honest}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", nargs="+", default=["clean", "feature_trigger", "minmax"], choices=list(fraud.ATTACKS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    print(f"fraud-synth, seed {args.seed}: AUPRC and ASR in %; clip kept: share of the row's norm left by clip "
          f"(attacker / largest bank); quarantined: client-rounds (attacker / honest)")
    print(f"{'attack':<17}{'variant':<15}{'AUPRC':>7}{'ASR':>7}{'clip kept':>14}{'quarantined':>13}")
    for a in args.attacks:
        for v in args.variants:
            o = run(a, v, args.seed)
            kept = "-" if o["kept_big"] is None else \
                f"{'-' if o['kept_mal'] is None else format(o['kept_mal'], '.2f')} / {o['kept_big']:.2f}"
            print(f"{a:<17}{v:<15}{fraud.pct(o['auprc']):>7}{fraud.pct(o['asr']):>7}{kept:>14}"
                  f"{o['q_mal']:>7} / {o['q_honest']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
