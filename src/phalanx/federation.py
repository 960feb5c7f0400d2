"""The round loop shared by the simulator and the networked server.

One round: sample clients -> local training (malicious clients may poison their data) -> the
update matrix U [k, d] -> the model-poisoning attack rewrites the malicious rows -> the defense
pipeline aggregates -> ``params += server_lr * g`` -> metrics -> store.

Every random draw is derived from ``(seed, round, client)``, so a run is reproducible bit for bit
and can resume from any round with only the parameters and the stateful defenses' state.
"""

from __future__ import annotations

import copy
import inspect
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .attacks.base import Attack
from .checkpoint import load_checkpoint, restore, save_checkpoint
from .config import ExperimentConfig
from .context import AttackContext, RoundContext
from .data import Dataset, load_configured, partition
from .defenses.pipeline import build_defense
from .defenses.validate import robust_z
from .errors import ConfigError, PhalanxError
from .metrics import client_stats, detection, imbalance_metrics, positive_scores
from .models import build_model
from .registry import ATTACKS, POISONS
from .seeding import derived_seeds
from .training import (LocalSpec, Shards, evaluate, local_momentum_update, local_update,
                       vectorized_momentum_updates, vectorized_updates)
from .updates import flatten_params, load_flat


def _build_with_classes(registry, name: str, params: dict, num_classes: int):
    params = dict(params)
    if "num_classes" in inspect.signature(registry.get(name)).parameters:
        params.setdefault("num_classes", num_classes)
    return registry.build(name, **params)


@dataclass
class RoundResult:
    round: int
    metrics: dict[str, Any]
    clients: list[dict[str, Any]]
    aggregate: torch.Tensor
    report: Any


@dataclass
class Hooks:
    """Extension points. Each list is called in order.

    client_update(update, client_id, round) -> update: a client-side transform (DP noise, ...).
    before_aggregate(U, ctx) -> None: may fill ``ctx.extras`` (signed envelopes, ...).
    evaluators(params) -> dict: extra metrics at evaluation rounds (backdoor success, ...).
    """

    client_update: list[Callable] = field(default_factory=list)
    before_aggregate: list[Callable] = field(default_factory=list)
    evaluators: list[Callable] = field(default_factory=list)


class Federation:
    """A simulated federation built from an ExperimentConfig."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset | None = None, hooks: Hooks | None = None):
        self.cfg = cfg
        fed = cfg.federation
        ds = dataset or load_configured(cfg.data)
        if cfg.data.train_subset or cfg.data.test_subset:
            ds = ds.subset(cfg.data.train_subset, cfg.data.test_subset, seed=cfg.seed)
        self.server_x, self.server_y = ds.x_train[:0], ds.y_train[:0]
        if fed.server_data:  # a clean held-out set for the server (FLTrust's root set, validation)
            perm = torch.from_numpy(np.random.default_rng([cfg.seed, 5]).permutation(len(ds.y_train)))
            keep, held = perm[fed.server_data:].sort().values, perm[:fed.server_data]
            self.server_x, self.server_y = ds.x_train[held], ds.y_train[held]
            ds = ds.take_train(keep)
        self.data = ds
        self.parts = partition(ds.y_train, fed.num_clients, cfg.data.partition, seed=cfg.seed,
                               **self._partition_params())
        self.client_ids = [f"client{i:03d}" for i in range(fed.num_clients)]
        self.num_samples = torch.tensor([len(p) for p in self.parts], dtype=torch.float32)
        self.model = build_model(cfg.model.name, ds.in_shape, ds.num_classes, cfg.seed, **cfg.model.params)
        self.params = flatten_params(self.model)
        nbyz = cfg.num_byzantine()
        order = np.random.default_rng([cfg.seed, 7]).permutation(fed.num_clients)
        self.malicious = torch.zeros(fed.num_clients, dtype=torch.bool)
        self.malicious[torch.from_numpy(order[:nbyz])] = True
        self.attack: Attack | None = ATTACKS.build(cfg.attack.name, **cfg.attack.params) if cfg.attack.name else None
        self.poison = (_build_with_classes(POISONS, cfg.attack.poison, cfg.attack.poison_params, ds.num_classes)
                       if cfg.attack.poison else None)
        # a poison may hand each attacker its own part (distributed backdoors): for_client(j, m)
        self.poisons: dict[int, Any] = {}
        if self.poison is not None:
            for j, c in enumerate(order[:nbyz].tolist()):
                split = getattr(self.poison, "for_client", None)
                self.poisons[c] = split(j, nbyz) if split else self.poison
        self.server_f = cfg.server_f()  # the server's own guess, never the attack's true count
        # the clients' side: each client's own signing key, used only where a client acts (run_round
        # signs each row as its client sends it); the server's registry holds the public keys only
        self.signers: dict[str, Any] = {}
        inject: dict[str, Any] = {}
        # a fresh random run id per run, bound into every envelope (run() binds the store's when given)
        self.run_id: str | None = uuid.uuid4().hex[:12]
        if fed.signing:
            from .defenses.signing import ClientSigner, KeyRegistry

            self.signers = {cid: ClientSigner.generate(cid) for cid in self.client_ids}
            registry = KeyRegistry()
            for cid, signer in self.signers.items():
                registry.add(cid, signer.public_key)
            inject = {"registry": registry, "run_id": self.run_id}
        inject["sample_rate"] = (fed.clients_per_round or fed.num_clients) / fed.num_clients  # central DP's q
        self.defense = build_defense(cfg.defense, f=self.server_f, **inject)
        self.uses_f = any(getattr(stage, "f", None) is not None for stage in self.defense.stages)
        self.spec = LocalSpec(fed.local_epochs, fed.batch_size, fed.lr, fed.momentum, fed.weight_decay,
                              fed.local_steps)
        # worker momentum (federation.client_momentum): client index -> its momentum buffer [d], the
        # client's own state (never shown to defenses); at most num_clients x d floats
        self.momentum_buffers: dict[int, torch.Tensor] = {}
        self.hooks = hooks or Hooks()
        if self.poison is not None and hasattr(self.poison, "metrics"):  # backdoor success and the like
            self.hooks.evaluators.append(lambda params: self.poison.metrics(self.model, params, self.data))
        self.attack_history: dict[str, Any] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.first_quarantine: dict[str, int] = {}
        self.round = 0
        if fed.dp_sgd is not None:
            self.setup_dp()
        if fed.recovery_drop is not None and not fed.server_data:
            raise ConfigError("federation.recovery_drop needs server data to measure accuracy: "
                              "set federation.server_data (for example 500)")

    def _partition_params(self) -> dict[str, Any]:
        d = self.cfg.data
        if d.partition == "silo":
            return {"silos": self.data.silo_train, "names": self.data.silos}
        return {"dirichlet": {"alpha": d.alpha}, "shards": {"shards_per_client": d.shards_per_client}}.get(
            d.partition, {})

    # ------------------------------------------------------------------ one round
    def sample(self, rnd: int) -> np.ndarray:
        fed = self.cfg.federation
        k = fed.clients_per_round or fed.num_clients
        if k == fed.num_clients:
            return np.arange(k)
        return np.sort(np.random.default_rng([self.cfg.seed, rnd, 11]).choice(fed.num_clients, k, replace=False))

    def client_generator(self, rnd: int, client: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, rnd, client]).integers(2**62)))

    def client_generators(self, rnd: int, clients) -> list[torch.Generator]:
        """``client_generator`` for many clients, their seeds derived in one vectorized pass."""
        return [torch.Generator().manual_seed(s) for s in derived_seeds([self.cfg.seed, rnd], clients).tolist()]

    def setup_dp(self) -> None:
        """Per-client DP-SGD bookkeeping; with target_epsilon, the noise that reaches it by the last round."""
        from .defenses.privacy import noise_for_epsilon

        dp, fed = self.cfg.federation.dp_sgd, self.cfg.federation
        self.dp_steps = {c: 0 for c in range(fed.num_clients)}
        self.dp_noise = dp.noise_multiplier
        if dp.target_epsilon is not None:
            share = (fed.clients_per_round or fed.num_clients) / fed.num_clients
            plans = {(self.dp_rate(len(p)), fed.local_epochs * -(-len(p) // fed.batch_size)) for p in self.parts}
            self.dp_noise = max(noise_for_epsilon(dp.target_epsilon, q, max(1, round(steps * fed.rounds * share)),
                                                  dp.delta) for q, steps in plans)

    def dp_rate(self, n: int) -> float:
        """Opacus' Poisson sampling rate for a client of n samples: 1 / (batches per epoch)."""
        return 1.0 / -(-n // min(self.cfg.federation.batch_size, n))

    def dp_epsilon(self) -> float:
        """The largest epsilon any honest client has spent so far (RDP accountant)."""
        from .defenses.privacy import dp_epsilon

        dp = self.cfg.federation.dp_sgd
        eps = [dp_epsilon(self.dp_noise, self.dp_rate(len(self.parts[c])), steps, dp.delta)
               for c, steps in self.dp_steps.items() if steps]
        return max(eps, default=0.0)

    def dp_client_update(self, rnd: int, c: int) -> tuple[torch.Tensor, float]:
        from .defenses.privacy import dp_sgd_train

        fed, dp = self.cfg.federation, self.cfg.federation.dp_sgd
        idx = self.parts[c]
        load_flat(self.model, self.params)
        self.model.train()
        seed = int(np.random.default_rng([self.cfg.seed, rnd, c, 23]).integers(2**31))
        dp_sgd_train(self.model, self.data.x_train[idx], self.data.y_train[idx], fed.local_epochs,
                     min(fed.batch_size, len(idx)), fed.lr, self.dp_noise, dp.max_grad_norm, dp.delta, seed)
        self.dp_steps[c] += fed.local_epochs * -(-len(idx) // fed.batch_size)
        return flatten_params(self.model) - self.params, float("nan")

    def train_clients(self, rnd: int, chosen: np.ndarray, attacking: bool) -> tuple[torch.Tensor, list[float]]:
        """Local training of the chosen clients: (U [k, d], mean training loss per client).

        A malicious client trains on its own terms only in an attacking round of a config with an
        attack or a data poison for it: then it poisons its batches, follows the attack's training
        hook (``Attack.training_hook``, sequential engine) and skips DP-SGD. Otherwise it trains
        exactly like an honest client: with DP-SGD when ``federation.dp_sgd`` is set (its steps
        counted by the accountant), else with the configured engine.

        With ``federation.client_momentum``, every chosen client (malicious ones too: the attack
        rewrites their rows afterwards) continues from its momentum buffer and stores it back;
        clients not chosen keep theirs.
        """
        from .attacks.base import TrainingInfo

        fed = self.cfg.federation
        chosen = np.asarray(chosen)
        k = len(chosen)
        own_terms = [False] * k
        if attacking and (self.attack is not None or self.poisons):
            for i in np.flatnonzero(self.malicious[torch.from_numpy(chosen)].numpy()).tolist():
                own_terms[i] = self.attack is not None or int(chosen[i]) in self.poisons
        make_hook = getattr(self.attack, "training_hook", None)
        hooks: list = [None] * k
        if make_hook is not None:
            for i in (i for i, own in enumerate(own_terms) if own):
                hooks[i] = make_hook(TrainingInfo(rnd, self.client_ids[chosen[i]], self.params, self.attack_history))
        rows: list = [None] * k
        losses: list = [None] * k
        whole = None  # U when every client trained in one vectorized call, rows in order
        if fed.dp_sgd is not None:  # everyone trains privately but an attacker at work
            for i, c in enumerate(chosen):
                if not own_terms[i]:
                    rows[i], losses[i] = self.dp_client_update(rnd, int(c))
        batch = [i for i in range(k) if rows[i] is None and hooks[i] is None]
        if fed.engine == "vectorized" and batch:  # hooked clients take the sequential path below
            data = Shards(self.data.x_train, self.data.y_train, [self.parts[c] for c in chosen[batch].tolist()])
            gens = self.client_generators(rnd, chosen[batch])
            poisons = [self.poisons.get(int(chosen[i])) if own_terms[i] else None for i in batch]
            if fed.client_momentum:
                start = torch.stack([self.momentum_buffer(int(chosen[i])) for i in batch])
                U, vlosses, B = vectorized_momentum_updates(self.model, self.params, data, self.spec, gens,
                                                            poisons, start)
                for j, i in enumerate(batch):
                    self.momentum_buffers[int(chosen[i])] = B[j].clone()
            else:
                U, vlosses = vectorized_updates(self.model, self.params, data, self.spec, gens, poisons)
            if len(batch) == k:
                whole, losses = U, list(vlosses)
            else:
                for j, i in enumerate(batch):
                    rows[i], losses[i] = U[j], vlosses[j]
        for i, c in enumerate(chosen if whole is None else ()):
            if rows[i] is None:
                idx = self.parts[c]
                poison = self.poisons.get(int(c)) if own_terms[i] else None
                args = (self.model, self.params, self.data.x_train[idx], self.data.y_train[idx], self.spec,
                        self.client_generator(rnd, int(c)))
                if fed.client_momentum:
                    rows[i], losses[i], self.momentum_buffers[int(c)] = local_momentum_update(
                        *args, self.momentum_buffer(int(c)), poison, hooks[i])
                else:
                    rows[i], losses[i] = local_update(*args, poison, hooks[i])
        if fed.dp_sgd is None and self.hooks.client_update:  # a DP-SGD run applies no client-side transforms
            rows = list(whole) if whole is not None else rows
            whole = None
            for i, c in enumerate(chosen):
                for hook in self.hooks.client_update:
                    rows[i] = hook(rows[i], self.client_ids[c], rnd)
        return (torch.stack(rows) if whole is None else whole), losses

    def momentum_buffer(self, client: int) -> torch.Tensor:
        """Client ``client``'s worker-momentum buffer [d]: zeros before its first round."""
        buf = self.momentum_buffers.get(client)
        return torch.zeros_like(self.params) if buf is None else buf

    def apply_attack(self, U: torch.Tensor, mal: torch.Tensor, rnd: int, chosen: np.ndarray | None = None) -> torch.Tensor:
        if self.attack is None or not bool(mal.any()):
            return U
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, rnd, 13]).integers(2**62)))
        chosen = np.arange(U.shape[0]) if chosen is None else chosen
        sim_order = np.concatenate([chosen[~mal.numpy()], chosen[mal.numpy()]])  # [honest; crafted]

        def server_view(n: int) -> RoundContext:
            view = self.round_context(rnd, sim_order[:n] if n <= len(sim_order) else np.arange(n) % len(self.client_ids))
            view.num_samples = None
            return view

        actx = AttackContext(own=U[mal].clone(), n=U.shape[0], round=rnd, generator=gen,
                             global_params=self.params, aggregator=self.defense.as_attackers_see_it(),
                             history=self.attack_history,
                             server_view=server_view,
                             honest_ids=[self.client_ids[c] for c in chosen[~mal.numpy()]],
                             own_ids=[self.client_ids[c] for c in chosen[mal.numpy()]])
        bad = self.attack(U[~mal].clone(), actx)
        if bad.shape != (int(mal.sum()), U.shape[1]):
            raise ConfigError(f"attack {self.cfg.attack.name!r} returned shape {tuple(bad.shape)}, "
                              f"expected {(int(mal.sum()), U.shape[1])}")
        U = U.clone()
        U[mal] = bad.to(U.dtype)
        return U

    def round_context(self, rnd: int, chosen: np.ndarray) -> RoundContext:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, rnd, 17]).integers(2**62)))
        ctx = RoundContext(round=rnd, client_ids=[self.client_ids[c] for c in chosen],
                           global_params=self.params.clone(), generator=gen,
                           num_samples=self.num_samples[torch.from_numpy(chosen)])
        if len(self.server_y):
            ctx.server_update = lambda: self.server_update(rnd)
            ctx.val_loss = lambda p: evaluate(self.model, p, self.server_x, self.server_y)[1]
        return ctx

    def server_update(self, rnd: int) -> torch.Tensor:
        """The update the server computes on its own clean data (FLTrust's root update)."""
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, rnd, 19]).integers(2**62)))
        upd, _ = local_update(self.model, self.params, self.server_x, self.server_y, self.spec, gen)
        return upd

    def run_round(self, rnd: int) -> RoundResult:
        t0 = time.perf_counter()
        chosen = self.sample(rnd)
        mal = self.malicious[torch.from_numpy(chosen)]
        attacking = self.cfg.attack.active(rnd)
        U, losses = self.train_clients(rnd, chosen, attacking)
        if attacking:
            U = self.apply_attack(U, mal, rnd, chosen)
        ctx = self.round_context(rnd, chosen)
        if self.signers:  # each client signs the row it sends with its own key (an attacker its crafted row)
            t_sign = time.perf_counter()
            envelopes = [self.signers[cid].sign(U[i], self.run_id, rnd) for i, cid in enumerate(ctx.client_ids)]
            sign_seconds = time.perf_counter() - t_sign
            tamper = getattr(self.attack, "tamper_envelopes", None)
            if attacking and tamper is not None and bool(mal.any()):  # forged, replayed, impersonated
                from .attacks.envelopes import EnvelopeContext

                gen = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, rnd, 23]).integers(2**62)))
                own = {cid: self.signers[cid] for cid, m in zip(ctx.client_ids, mal.tolist()) if m}
                U, envelopes = tamper(U, envelopes, EnvelopeContext(rnd, self.run_id, list(ctx.client_ids), mal.clone(),
                                                                    own, self.attack_history, gen))
            ctx.extras["envelopes"] = envelopes
        for hook in self.hooks.before_aggregate:
            hook(U, ctx)
        w = ctx.num_samples.clone() if self.cfg.federation.weighting == "samples" else torch.ones(len(chosen))
        t1 = time.perf_counter()
        snapshot = copy.deepcopy(self.defense.state_dict()) if self.cfg.federation.recovery_drop else None
        g, report = self.defense(U, w, ctx)
        agg_seconds = time.perf_counter() - t1
        rolled_back = False
        if snapshot is not None:
            g, report, rolled_back = self.recover(U, w, ctx, g, report, snapshot)
        step = self.cfg.federation.server_lr * g.to(self.params.dtype)
        self.params = self.params + step
        discarded = report.discarded()
        metrics: dict[str, Any] = {"train_loss": float(np.nanmean(losses)) if not all(np.isnan(losses)) else None, "agg_seconds": agg_seconds,
                                   "rejected": int(discarded.sum()), "attacking": bool(attacking and mal.any()),
                                   "rolled_back": rolled_back, "drift": float(step.double().norm()),
                                   **detection(discarded, mal)}
        if self.signers:
            metrics["sign_seconds"] = sign_seconds
        if self.cfg.federation.dp_sgd is not None:
            metrics["epsilon"] = self.dp_epsilon()
        for step in self.defense.post:  # central DP reports its epsilon (a property)
            if isinstance(getattr(step, "epsilon", None), float):
                metrics["epsilon_central"] = step.epsilon
        fed = self.cfg.federation
        if (rnd + 1) % fed.eval_every == 0 or rnd + 1 == fed.rounds:
            metrics.update(self.evaluate())
        metrics["seconds"] = time.perf_counter() - t0
        norms, cos, finite = client_stats(U, g)  # non-finite rows: no norm, no cosine
        for cid in self.quarantined() or ():  # held by a stage, whichever stage's reason the row shows
            self.first_quarantine.setdefault(cid, rnd)
        metrics.update(self.quarantine_metrics())
        columns = zip(chosen.tolist(), mal.tolist(), finite.tolist(), norms.tolist(), cos.tolist(), w.tolist(),
                      discarded.tolist())
        clients = [{"client_id": self.client_ids[c], "malicious": m,
                    "norm": nm if ok else None, "cosine": cs if ok else None,
                    "weight": wt * (0.0 if out else 1.0),
                    "flags": [report.reasons[i]] if i in report.reasons else []}
                   for i, (c, m, ok, nm, cs, wt, out) in enumerate(columns)]
        for rep in report.info.get("reports", []):  # what each stage saw, per client
            if rep.scores is not None and len(rep.scores) == len(chosen):
                key = f"{rep.name}_score"
                scores = rep.scores.tolist() if hasattr(rep.scores, "tolist") else rep.scores
                for row, score in zip(clients, scores):
                    row[key] = float(score)
        self.round = rnd + 1
        return RoundResult(rnd, metrics, clients, g, report)

    def bind_run(self, run_id: str) -> None:
        """Make ``run_id`` the run id clients sign and the verify layers accept."""
        self.run_id = run_id
        for stage in self.defense.stages:
            if hasattr(stage, "bind_run"):
                stage.bind_run(run_id)

    def attackers(self) -> set[str]:
        """The ids of the clients that attack: none when the config has no attack or poison."""
        if not (self.cfg.attack.name or self.cfg.attack.poison):
            return set()
        return {cid for cid, m in zip(self.client_ids, self.malicious.tolist()) if m}

    def quarantined(self) -> set[str] | None:
        """The client ids some stage holds in quarantine now (None: no stage quarantines)."""
        sets = [q for s in self.defense.stages if isinstance(q := getattr(s, "quarantined", None), set)]
        return set().union(*sets) if sets else None

    def quarantine_metrics(self) -> dict[str, Any]:
        """Precision and recall of the server's quarantine (every stage's ``quarantined`` id set, over
        all clients, after this round) as a detector of the attackers; empty without such a stage."""
        held = self.quarantined()
        if held is None:
            return {}
        bad = self.attackers()
        tp = len(held & bad)
        return {"quarantined": len(held), "honest_quarantined": len(held - bad),
                "quarantine_precision": tp / len(held) if held else None,
                "quarantine_recall": tp / len(bad) if bad else None}

    def recover(self, U, w, ctx, g, report, snapshot):
        """Roll back a round whose aggregate drops the server's validation accuracy sharply.

        The defense state returns to the start of the round, and the round is aggregated again
        without the clients flagged in it: rejected by a stage, a norm robust z-score above 3, or
        a negative cosine with the coordinate-wise median update.
        """
        before = evaluate(self.model, self.params, self.server_x, self.server_y)[0]
        after = evaluate(self.model, self.params + self.cfg.federation.server_lr * g, self.server_x, self.server_y)[0]
        if before - after <= self.cfg.federation.recovery_drop:
            return g, report, False
        flagged = report.discarded() | ~torch.isfinite(U).all(1)
        clean = torch.nan_to_num(U, 0.0, 0.0, 0.0)
        flagged |= robust_z(clean.double().norm(dim=1)).abs() > 3
        med = clean.median(0).values
        flagged |= (clean.double() @ med.double()) < 0
        self.defense.load_state_dict(snapshot)
        w2 = torch.where(flagged, torch.zeros_like(w), w)
        self.events.append((ctx.round, "rollback", {"accuracy_before": before, "accuracy_after": after,
                                                    "excluded": [ctx.client_ids[i] for i in
                                                                 torch.nonzero(flagged).flatten().tolist()]}))
        g2, report2 = self.defense(U, w2, ctx)
        for i in torch.nonzero(flagged).flatten().tolist():
            report2.reject(i, "rollback")
        return g2, report2, True

    def evaluate(self) -> dict[str, Any]:
        acc, loss = evaluate(self.model, self.params, self.data.x_test, self.data.y_test)
        out = {"accuracy": acc, "loss": loss}
        if self.data.num_classes == 2:  # binary (fraud): accuracy says little at 0.2% positives
            scores = positive_scores(self.model, self.params, self.data.x_test)
            bad = ~torch.isfinite(scores)  # a diverged model ranks nothing: its NaN scores count as ties
            out.update(imbalance_metrics(self.data.y_test, torch.where(bad, 0.5, scores)))
            if bad.any():
                out["nonfinite_scores"] = int(bad.sum())
        for ev in self.hooks.evaluators:
            out.update(ev(self.params))
        return out

    # ------------------------------------------------------------------ the whole run
    def run(self, store=None, run_id: str | None = None, on_round: Callable | None = None,
            cell: str | None = None, checkpoint: str | Path | None = None) -> dict[str, Any]:
        """Run every remaining round; log to ``store`` when given. Returns the final metrics.

        With ``checkpoint`` (a file path), the state is saved atomically after every round, and
        a run whose checkpoint exists resumes from it (same config required).
        """
        if checkpoint is not None and Path(checkpoint).is_file():
            state = load_checkpoint(checkpoint)
            restore(self, state)
            run_id = run_id or state["run_id"] or next(  # no store: the restored verify layer's run id
                (s.run_id for s in self.defense.stages if hasattr(s, "bind_run")), None)
            if store is not None and run_id is not None:
                store.truncate_after(run_id, self.round - 1)
                store.reopen_run(run_id)
                store.log_event(run_id, self.round, "resumed", {"from_round": self.round})
        if store is not None and run_id is None:
            run_id = store.start_run(self.cfg.model_dump(), self.cfg.name, self.cfg.seed, run_id=self.run_id, cell=cell)
        self.bind_run(run_id or self.run_id)
        last: dict[str, Any] = {}
        try:
            for rnd in range(self.round, self.cfg.federation.rounds):
                res = self.run_round(rnd)
                last.update(res.metrics)
                if store is not None:
                    store.log_round(run_id, rnd, res.metrics)
                    store.log_clients(run_id, rnd, res.clients)
                    for ev_round, kind, detail in self.events:
                        store.log_event(run_id, ev_round, kind, detail)
                self.events.clear()
                if checkpoint is not None:
                    save_checkpoint(checkpoint, self, run_id)
                if on_round is not None:
                    on_round(res)
        except BaseException as e:  # never leave the run 'running': Ctrl-C/SIGTERM or an error
            if store is not None and run_id is not None:
                interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
                why = "interrupted" if interrupted else (str(e) if isinstance(e, PhalanxError)
                                                         else f"{type(e).__name__}: {e}")
                store.finish_run(run_id, {"error": why, "round": self.round},
                                 status="interrupted" if interrupted else "failed")
            raise
        if not last and store is not None and run_id is not None:  # resumed after the last round
            rounds = store.read_run(run_id).rounds
            last = rounds[-1] if rounds else {}
        final = {k: last[k] for k in ("accuracy", "loss", "auprc", "roc_auc", "recall_at_1fpr", "best_f1") if k in last}
        bad = self.attackers()
        if self.first_quarantine:  # a clean run's quarantines are all of honest clients
            caught = [r for c, r in self.first_quarantine.items() if c in bad]
            if bad:
                final["quarantined_attackers"] = len(caught)
                final["rounds_to_quarantine"] = float(np.mean(caught)) + 1 if caught else None
            final["honest_ever_quarantined"] = len(set(self.first_quarantine) - bad)
        final.update({k: v for k, v in last.items() if k.startswith(("asr", "epsilon"))})
        if self.uses_f:
            final["defense_f"] = self.server_f
        if store is not None:
            store.finish_run(run_id, final)
        return final
