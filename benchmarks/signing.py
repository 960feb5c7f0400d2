"""Cost of signed updates: client signing and server verification vs one round's aggregation.

For each d, an n x d float32 update matrix is signed row by row (ClientSigner.sign: SHA-256 of the
row + ECDSA P-256) and verified by the ``verify`` layer (signature, digest, nonce, round checks).
The baselines, timed in the same process: mean aggregation ``U.mean(0)`` and coordinate-wise
median ``torch.median(U, 0)`` of the same matrix. Times are medians over ``--repeats``.

    python benchmarks/signing.py [--dims tabular,1000000] [--repeats 5] [--n 25] [--threads 1] [--smoke]

``tabular`` stands for the size of the fraud-detection model of ``configs/fraud.yaml`` (tabular_mlp,
hidden [64, 32], on fraud-synth's features): the per-round cost at a real cross-silo model's size.
Signing is what each client does for its own update (in parallel across clients); verifying is
what the server does for the whole round.

Both sides get the same thread budget (``--threads``, default 1: on a shared machine extra torch
threads mostly measure contention).

Before the headline, a line checks what the timing relies on: the ``verify`` layer accepts every
honestly signed row and rejects every forged one, for each kind of forgery (a row changed after
signing, a signature by a key other than the registered one, another client's envelope, a replayed
envelope, an envelope for another round or another run), with the reason it records.

The last line is the headline: verify time of one round as a multiple of one median aggregation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from phalanx.context import simple_round_context
from phalanx.defenses.signing import ClientSigner, KeyRegistry, Verify, row_digest, sign_updates


def _timed(fn, repeats: int) -> float:
    """Median wall time of fn() in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tabular_d() -> int:
    """Parameters of configs/fraud.yaml's model: tabular_mlp [64, 32] on fraud-synth's features."""
    from phalanx.data import load_dataset
    from phalanx.models import build_model
    from phalanx.updates import flatten_params

    ds = load_dataset("fraud-synth")
    return int(flatten_params(build_model("tabular_mlp", ds.in_shape, ds.num_classes, 0, hidden=[64, 32])).numel())


def _fmt_d(d: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if d >= div and d % (div // 10) == 0:
            return f"{d / div:g}{unit}"
    return str(d)


def measure(n: int, d: int, repeats: int, workers: int, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(n, d, generator=gen)
    ids = [f"c{i}" for i in range(n)]
    reg = KeyRegistry()
    signers = {cid: ClientSigner(cid, reg.generate(cid)) for cid in ids}
    run_id = "bench"

    sign = _timed(lambda: sign_updates(U, signers, ids, run_id, 0), repeats) / n
    sha = _timed(lambda: [row_digest(U[i]) for i in range(n)], repeats) / n

    batches = iter([sign_updates(U, signers, ids, run_id, 0) for _ in range(repeats + 1)])
    w = torch.ones(n)

    def verify_round():  # a fresh layer and fresh envelopes each time, so no row is a replay
        layer = Verify(reg, run_id, workers=workers)
        ctx = simple_round_context(U, extras={"envelopes": next(batches)})
        _, w2, rep = layer(U, w, ctx)
        assert not rep.reasons, rep.reasons

    verify = _timed(verify_round, repeats)
    mean = _timed(lambda: U.mean(0), repeats)
    median = _timed(lambda: torch.median(U, 0), repeats)
    return {"d": d, "sign": sign, "sha": sha, "verify": verify, "mean": mean, "median": median}


def flower_costs(d: int, repeats: int) -> dict[str, float] | None:
    """A Flower reply of d float32 parameters: the client's sign_reply (digest of its arrays + ECDSA),
    and the server's share per reply (digest of the arrays as received + signature check)."""
    try:
        import numpy as np
        from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

        from phalanx.integrations.flower_client import record_digest, sign_reply
    except ImportError:  # Flower is an optional extra
        return None
    from phalanx.defenses.signing import _ECDSA

    rng = np.random.default_rng(0)
    half = d // 2
    arrays = ArrayRecord({"w": Array(rng.standard_normal(half, dtype=np.float32)),
                          "b": Array(rng.standard_normal(d - half, dtype=np.float32))})
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as in a ServerApp
    signer = ClientSigner.generate("c0")
    out = Message(content=RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=1)

    def client():
        reply = Message(RecordDict({"arrays": arrays}), reply_to=out)
        return sign_reply(reply, signer, "bench", 0)

    env = client()
    pub = signer.public_key

    def server():
        assert record_digest(arrays) == env.digest
        pub.verify(env.signature, env.message(), _ECDSA)

    return {"sign": _timed(client, repeats), "verify": _timed(server, repeats)}


FORGERIES = {  # kind -> the reason the verify layer must record for every row
    "tampered row": "digest_mismatch", "wrong key": "bad_signature", "impersonation": "impersonation",
    "replay": "replayed_nonce", "stale round": "stale_round", "wrong run": "wrong_run"}


def forgery_check(n: int, d: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """For honest rows and each kind of forgery: (rows handled as expected, rows). Honest rows must
    all be accepted; forged rows must all be rejected with the reason in FORGERIES."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(n, d, generator=gen)
    ids = [f"c{i}" for i in range(n)]
    reg, rogue = KeyRegistry(), KeyRegistry()
    signers = {cid: ClientSigner(cid, reg.generate(cid)) for cid in ids}
    impostors = {cid: ClientSigner(cid, rogue.generate(cid)) for cid in ids}  # same ids, other keys
    run_id, rnd, w = "bench", 3, torch.ones(n)

    def verify(V, envs, layer=None, round_=rnd):
        layer = layer or Verify(reg, run_id)
        _, w2, rep = layer(V, w, simple_round_context(V, round=round_, extras={"envelopes": envs}))
        return w2, rep

    out = {}
    layer = Verify(reg, run_id)
    envs = sign_updates(U, signers, ids, run_id, rnd)
    w2, rep = verify(U, envs, layer)
    out["honest"] = (sum(1 for i in range(n) if w2[i] > 0 and i not in rep.reasons), n)
    forged = {
        "tampered row": (U + torch.where(torch.arange(d) == 0, 1e-3, 0.0), sign_updates(U, signers, ids, run_id, rnd)),
        "wrong key": (U, sign_updates(U, impostors, ids, run_id, rnd)),
        "impersonation": (U, [sign_updates(U, signers, ids, run_id, rnd)[(i + 1) % n] for i in range(n)]),
        "stale round": (U, sign_updates(U, signers, ids, run_id, rnd - 1)),
        "wrong run": (U, sign_updates(U, signers, ids, "another-run", rnd)),
    }
    for kind, (V, e) in forged.items():
        w2, rep = verify(V, e)
        out[kind] = (sum(1 for i in range(n) if w2[i] == 0 and rep.reasons.get(i) == FORGERIES[kind]), n)
    w2, rep = verify(U, envs, layer)  # the envelopes accepted above, sent again to the same server
    out["replay"] = (sum(1 for i in range(n) if w2[i] == 0 and rep.reasons.get(i) == "replayed_nonce"), n)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="tabular,1000000",
                    help="comma-separated update sizes d ('tabular': the fraud model's size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=25, help="clients per round")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the baselines and hashing threads for verify (same budget)")
    ap.add_argument("--smoke", action="store_true", help="tiny run (d=1000, 1 repeat)")
    args = ap.parse_args(argv)
    dims = [1000] if args.smoke else [tabular_d() if x.strip() == "tabular" else int(x)
                                      for x in args.dims.split(",") if x.strip()]
    repeats = 1 if args.smoke else max(1, args.repeats)
    if not dims or min(dims) < 1 or args.n < 1:  # noqa: SIM102
        ap.error(f"--dims and --n must be positive, got dims={args.dims!r}, n={args.n}")

    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    rows = [measure(args.n, d, repeats, args.threads) for d in dims]
    ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    table = Table(title=f"signed updates: n={args.n}, threads={args.threads}, "
                        f"repeats={repeats} (median)")
    for col in ("d", "sign ms/update", "sha256 ms/update", "verify ms/update", "verify round ms",
                "mean agg ms", "median agg ms", "verify/mean", "verify/median"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(_fmt_d(r["d"]), ms(r["sign"]), ms(r["sha"]), ms(r["verify"] / args.n),
                      ms(r["verify"]), ms(r["mean"]), ms(r["median"]),
                      f"{r['verify'] / r['mean']:.2f}x", f"{r['verify'] / r['median']:.2f}x")
    console = Console(width=160)
    console.print(table)
    checked = forgery_check(args.n, min(dims))
    print(f"signature check at d={_fmt_d(min(dims))}: honest rows accepted {'%d/%d' % checked['honest']}; "
          "forged rows rejected with the expected reason: "
          + ", ".join(f"{k} {'%d/%d' % checked[k]}" for k in FORGERIES))
    for d in dims:
        fc = flower_costs(d, repeats)
        if fc is not None:
            print(f"flower reply at d={_fmt_d(d)}: client sign_reply {fc['sign'] * 1e3:.3f} ms; server digest + "
                  f"verify {fc['verify'] * 1e3:.3f} ms per reply, {fc['verify'] * args.n * 1e3:.1f} ms per round of "
                  f"{args.n}")
    top = rows[-1]
    print(f"verify of {args.n} updates at d={_fmt_d(top['d'])} = {top['verify'] / top['median']:.2f}x "
          f"of one median aggregation ({top['verify'] / top['mean']:.1f}x of one mean; "
          f"signing {top['sign'] * 1e3:.2f} ms per update)")


if __name__ == "__main__":
    main()
