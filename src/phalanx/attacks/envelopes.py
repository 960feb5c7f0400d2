"""Attacks on signed updates: forged signatures, replays and impersonation.

Byzantine clients hold valid keys, so a crafted row they sign with their own key passes the
``verify`` layer (only the other layers can stop it). These attacks instead break the envelope:
each malicious client sends a poisoned row, ``scale * own`` (an amplified sign flip by default,
so that a defense without ``verify`` feels it), and then rewrites its envelope after signing:

* ``forge_signature`` -- ``mode: wrong_key``: the envelope is signed by a key the server does not
  know, under the client's own id (``bad_signature``); ``mode: tampered``: the client signs its
  honest row and sends the poisoned one (``digest_mismatch``).
* ``replay`` -- ``source: own``: the client sends again the row and envelope it sent in the last
  round it took part in (``stale_round``; ``replayed_nonce`` inside verify's ``max_round_lag``
  window); in its first round it has nothing to replay and sends its poisoned row, validly signed.
  ``source: honest``: it replays an honest client's row and envelope captured in an earlier round
  (an eavesdropper's replay: another client's envelope, ``impersonation``).
* ``impersonate`` -- the envelope claims an honest client's id (the client signs it with a key it
  holds, not the victim's): ``impersonation``.

The hook: an attack with a ``tamper_envelopes(U, envelopes, ctx) -> (U', envelopes')`` method is
called by the simulator after every client signed the row it sends (``federation.signing``), in
rounds where the attack is active. ``ctx`` is an ``EnvelopeContext``: what the attackers know
(their own rows and keys, every envelope on the wire, their history); never the honest clients'
private keys. It must not modify its inputs. Without signing the hook is not called, and the
attack is just its poisoned rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric import ec

from ..context import AttackContext
from ..registry import ATTACKS
from .base import Attack
from .model_poisoning import check_choice, check_inputs, check_number


@dataclass
class EnvelopeContext:
    """What the attackers see when they tamper with envelopes after signing.

    round: the round. run_id: the run id envelopes are bound to. client_ids: one per row.
    malicious: bool [n], the attackers' own rows. signers: client id -> signer, the attackers'
    own keys only. history: the attack's cross-round memory (``AttackContext.history``).
    generator: a seeded ``torch.Generator``.
    """

    round: int
    run_id: str
    client_ids: list[str]
    malicious: torch.Tensor
    signers: dict[str, Any]
    history: dict[str, Any]
    generator: torch.Generator


class EnvelopeAttack(Attack):
    """Poisoned rows ``scale * own``; subclasses rewrite the envelopes in ``tamper_envelopes``."""

    name = "envelope"

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return check_inputs(self.name, honest, ctx) * self.scale

    def tamper_envelopes(self, U: torch.Tensor, envelopes: list, ctx: EnvelopeContext) -> tuple[torch.Tensor, list]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


class ForgeSignature(EnvelopeAttack):
    name = "forge_signature"

    def __init__(self, scale: float, mode: str):
        super().__init__(scale)
        self.mode = mode

    def tamper_envelopes(self, U, envelopes, ctx):
        from ..defenses.signing import ClientSigner

        out = list(envelopes)
        for i in torch.nonzero(ctx.malicious).flatten().tolist():
            cid, env = ctx.client_ids[i], envelopes[i]
            if self.mode == "wrong_key":  # a key of its own making, not the one the server registered
                rogue = ClientSigner(cid, ec.generate_private_key(ec.SECP256R1()))
                out[i] = rogue.sign_digest(env.digest, ctx.run_id, ctx.round)
            else:  # signs a harmless row (its crafted row scaled back), sends the crafted one
                harmless = U[i] / self.scale if self.scale else torch.zeros_like(U[i])
                out[i] = ctx.signers[cid].sign(harmless, ctx.run_id, ctx.round)
        return U, out

    def __repr__(self) -> str:
        return f"ForgeSignature(scale={self.scale}, mode={self.mode!r})"


class Replay(EnvelopeAttack):
    name = "replay"

    def __init__(self, scale: float, source: str):
        super().__init__(scale)
        self.source = source

    def tamper_envelopes(self, U, envelopes, ctx):
        memory = ctx.history.setdefault("replay", {"own": {}, "honest": None})
        U2, out = U.clone(), list(envelopes)
        bad = torch.nonzero(ctx.malicious).flatten().tolist()
        fresh = {ctx.client_ids[i]: (U[i].clone(), envelopes[i]) for i in bad}
        for i in bad:
            cid = ctx.client_ids[i]
            old = memory["own"].get(cid) if self.source == "own" else memory["honest"]
            if old is not None:
                U2[i], out[i] = old[0].to(U.dtype), old[1]
        memory["own"].update(fresh)  # what each attacker sent validly signed, for later rounds
        honest = torch.nonzero(~ctx.malicious).flatten().tolist()
        if honest:  # an eavesdropper's capture of one honest row and its envelope
            j = honest[int(torch.randint(len(honest), (1,), generator=ctx.generator))]
            memory["honest"] = (U[j].clone(), envelopes[j])
        return U2, out

    def __repr__(self) -> str:
        return f"Replay(scale={self.scale}, source={self.source!r})"


class Impersonate(EnvelopeAttack):
    name = "impersonate"

    def tamper_envelopes(self, U, envelopes, ctx):
        honest = [c for c, m in zip(ctx.client_ids, ctx.malicious.tolist()) if not m]
        if not honest:
            return U, list(envelopes)
        out = list(envelopes)
        for k, i in enumerate(torch.nonzero(ctx.malicious).flatten().tolist()):
            own = ctx.signers[ctx.client_ids[i]].sign(U[i], ctx.run_id, ctx.round)
            out[i] = replace(own, client_id=honest[k % len(honest)])  # claims the victim's id
        return U, out


@ATTACKS.register("forge_signature", family="malformed")
def forge_signature(scale: float = -4.0, mode: str = "wrong_key") -> Attack:
    """Poisoned rows under a forged envelope: signed by an unregistered key, or signed over another row."""
    check_number("forge_signature", "scale", scale)
    check_choice("forge_signature", "mode", mode, ("wrong_key", "tampered"))
    return ForgeSignature(scale, mode)


@ATTACKS.register("replay", family="malformed")
def replay(scale: float = -4.0, source: str = "own") -> Attack:
    """Replayed updates: a client's own earlier row and envelope (stale), or a captured honest one."""
    check_number("replay", "scale", scale)
    check_choice("replay", "source", source, ("own", "honest"))
    return Replay(scale, source)


@ATTACKS.register("impersonate", family="malformed")
def impersonate(scale: float = -4.0) -> Attack:
    """Poisoned rows whose envelopes claim an honest client's identity."""
    check_number("impersonate", "scale", scale)
    return Impersonate(scale)
