"""The published shape of distributed SGD under attack, checked on a stored `configs/grid_dsgd.yaml` run.

    phalanx bench configs/grid_dsgd.yaml --db results/dsgd.db --workers 2
    python benchmarks/dsgd_shape.py results/dsgd.db

Karimireddy, He & Jaggi 2021 ("Learning from History for Byzantine Robust Optimization", ICML,
Table 1) and Allouah et al. 2023 ("Fixing by Mixing", AISTATS): with one local step per round and
no momentum, ALIE and IPM break Krum and the coordinate-wise median; worker momentum (each client
keeps its momentum across rounds) with centered clipping holds; bucketing helps on non-IID data
(Karimireddy, He & Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR). As numbers, per setting (accuracies against clean FedAvg without momentum):

* break: Krum and the median under ALIE and under IPM, without momentum, lose >= 10 points;
* momentum helps: each of those four cells gains >= 5 points with worker momentum;
* hold: centered clipping with worker momentum stays within 5 points of clean FedAvg under every
  attack (its worst case);
* bucketing helps (Dirichlet only): bucketing + centered clipping with worker momentum has a
  worst case no lower than centered clipping's with worker momentum (0.5-point tolerance).

Prints the accuracy table per setting, each check met or missed with its numbers, and a last line
with the count.
"""

from __future__ import annotations

import argparse

BROKEN, HELPS, HOLDS, TOLERANCE = 0.10, 0.05, 0.05, 0.005


def shape_checks(acc: dict[str, dict[str, float]], setting: str) -> list[tuple[bool, str]]:
    """(met, line) per check; ``acc[defense][attack]`` is a final accuracy (fraction), 'clean' the
    attack-free run; defenses 'mean', 'krum', 'median', 'cclip', with '+wm' for worker momentum,
    and 'bucketing+cclip+wm'. A check whose cells are missing is skipped."""
    out = []
    ref = acc.get("mean", {}).get("clean")
    if ref is None:
        return [(False, f"{setting}: no clean FedAvg run")]
    for rule in ("krum", "median"):
        for attack in ("alie", "ipm"):
            a, m = acc.get(rule, {}).get(attack), acc.get(f"{rule}+wm", {}).get(attack)
            if a is not None:
                out.append((ref - a >= BROKEN, f"{setting}: {attack} breaks {rule} without momentum: "
                            f"{100 * a:.1f} vs clean FedAvg {100 * ref:.1f} (needs a drop >= {100 * BROKEN:.0f} pts)"))
            if a is not None and m is not None:
                out.append((m - a >= HELPS, f"{setting}: worker momentum helps {rule} under {attack}: "
                            f"{100 * a:.1f} -> {100 * m:.1f} (needs >= +{100 * HELPS:.0f} pts)"))
    cc = acc.get("cclip+wm", {})
    attacked = {k: v for k, v in cc.items() if k != "clean"}
    if attacked:
        who = min(attacked, key=attacked.get)
        out.append((ref - attacked[who] <= HOLDS, f"{setting}: cclip with worker momentum holds: worst "
                    f"{100 * attacked[who]:.1f} ({who}) vs clean FedAvg {100 * ref:.1f} (within {100 * HOLDS:.0f} pts)"))
    bk = {k: v for k, v in acc.get("bucketing+cclip+wm", {}).items() if k != "clean"}
    if setting != "iid" and bk and attacked:
        b, c = min(bk.values()), min(attacked.values())
        out.append((b >= c - TOLERANCE, f"{setting}: bucketing helps on non-IID data: worst case "
                    f"bucketing+cclip+wm {100 * b:.1f} vs cclip+wm {100 * c:.1f}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db")
    ap.add_argument("--grid", default="dsgd")
    args = ap.parse_args()
    from phalanx.report.tables import load_results, summarize
    from phalanx.store import Store

    res = load_results(Store(args.db), args.grid)
    rows = summarize(res)
    checks = []
    for scen in res.scenarios:
        acc = {s.defense: {a: e.acc.mean for (sc, a), e in s.cells.items() if sc == scen and e.acc is not None}
               for s in rows}
        attacks = list(res.attacks)
        print(f"\n{scen[1]}: final accuracy (%)")
        print(f"{'defense':<20}" + "".join(f"{a:>10}" for a in attacks))
        for d, cells in acc.items():
            print(f"{d:<20}" + "".join(f"{100 * cells[a]:>10.1f}" if a in cells else f"{'-':>10}" for a in attacks))
        checks += shape_checks(acc, scen[1])
    print()
    for ok, line in checks:
        print(f"{'met   ' if ok else 'MISSED'} {line}")
    print(f"published shape: {sum(ok for ok, _ in checks)} of {len(checks)} checks met "
          f"({len(res.runs)} runs, {res.missing} missing)")


if __name__ == "__main__":
    main()
