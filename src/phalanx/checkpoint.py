"""Checkpoint and resume: everything a run needs to continue bit for bit after a kill.

Random draws in the simulator are derived from (seed, round, client), so the state is small:
the round number, the global parameters, every stateful defense stage's ``state_dict``, the
attack's cross-round memory (and its ``state_dict`` when it has one), the DP-SGD accountant's
steps per client, the first round each client was quarantined, each client's worker-momentum
buffer (``federation.client_momentum``), the run id in the store, and the global torch, NumPy and
Python RNG states. Files are written atomically (write to a temporary file, then rename).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PhalanxError

FORMAT = 2


def save_checkpoint(path: str | Path, fed, run_id: str | None = None, extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "config": fed.cfg.model_dump(),
        "round": fed.round,
        "params": fed.params.clone(),
        "defense": fed.defense.state_dict(),
        "attack_history": fed.attack_history,
        "attack_state": fed.attack.state_dict() if hasattr(fed.attack, "state_dict") else None,
        "dp_steps": dict(getattr(fed, "dp_steps", {})),
        "first_quarantine": dict(fed.first_quarantine),
        "momentum_buffers": {c: b.clone() for c, b in getattr(fed, "momentum_buffers", {}).items()},
        "torch_rng": torch.random.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "run_id": run_id,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PhalanxError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise PhalanxError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PhalanxError(f"{path}: not a phalanx checkpoint (format {FORMAT} expected)")
    return state


def restore(fed, state: dict[str, Any]) -> None:
    """Put a freshly built Federation into the checkpointed state."""
    from .config import parse_config

    try:  # fields added since the checkpoint was written take their defaults
        saved = parse_config(state["config"]).model_dump()
    except PhalanxError:
        saved = state["config"]
    if saved != fed.cfg.model_dump():
        raise PhalanxError("checkpoint was written by a different config; resume with the same config")
    if state["params"].shape != fed.params.shape:
        raise PhalanxError(f"checkpoint params have shape {tuple(state['params'].shape)}, "
                           f"model has {tuple(fed.params.shape)}")
    fed.round = int(state["round"])
    fed.params = state["params"].clone()
    fed.defense.load_state_dict(state["defense"])
    fed.attack_history.clear()
    fed.attack_history.update(state["attack_history"])
    if state.get("attack_state") is not None:
        fed.attack.load_state_dict(state["attack_state"])
    if hasattr(fed, "dp_steps"):
        fed.dp_steps.update(state["dp_steps"])
    fed.first_quarantine.clear()
    fed.first_quarantine.update(state["first_quarantine"])
    buffers = state.get("momentum_buffers", {})  # absent in checkpoints from before client_momentum
    for c, b in buffers.items():
        if b.shape != fed.params.shape:
            raise PhalanxError(f"checkpoint momentum buffer of client {c} has shape {tuple(b.shape)}, "
                               f"model has {tuple(fed.params.shape)}")
    fed.momentum_buffers = {int(c): b.clone() for c, b in buffers.items()}
    torch.random.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
