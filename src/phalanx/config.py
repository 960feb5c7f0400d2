"""Experiment configuration: pydantic models, YAML loading and ``--set a.b=c`` overrides.

Any mistake (a misspelt key, a wrong type, an out-of-range value, an unknown attack) becomes one
``ConfigError`` line per problem: the field, what is allowed, what was given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .registry import ATTACKS, DATASETS, DEFENSES, MODELS, POISONS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    dataset: str = "fashion-mnist"
    partition: Literal["iid", "dirichlet", "shards", "silo"] = Field(
        "iid", description="silo: one client per silo (bank) of a tabular dataset; num_clients = number of silos")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller: more skew)")
    shards_per_client: int = Field(2, ge=1)
    train_subset: int | None = Field(None, ge=1, description="use this many training samples")
    test_subset: int | None = Field(None, ge=1, description="evaluate on this many test samples")
    # dataset 'tabular': the user's own CSV / Parquet file (phalanx.data.tabular)
    path: str | None = Field(None, description="tabular: the .csv or .parquet file")
    label: str | None = Field(None, description="tabular: the binary label column (1 / True = fraud)")
    positive: Union[StrictInt, StrictBool, str, None] = Field(
        None, description="tabular: the label value of the positive class, when it is not 1 / True")
    silo: str | None = Field(None, description="tabular: the column naming each row's silo (bank)")
    features: list[str] | None = Field(None, description="tabular: feature columns (default: all others)")
    categorical: list[str] = Field(default_factory=list, description="tabular: columns to one-hot encode")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="tabular: test share of each (silo, label) group")
    params: dict[str, Any] = Field(default_factory=dict, description="parameters of a built-in dataset's "
                                   "factory (fraud-synth: banks, seed, ...)")

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        DATASETS.get(v)
        return v

    @model_validator(mode="after")
    def _tabular(self):
        fields = ("path", "label", "positive", "silo", "features")
        if self.dataset == "tabular":
            missing = [f for f in ("path", "label") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"dataset 'tabular' needs {' and '.join(missing)} (the file and its label column)")
            if self.params:
                raise ValueError("dataset 'tabular' takes its settings from path, label, silo, features, "
                                 f"categorical, positive and test_fraction, not params (got {sorted(self.params)})")
            if self.partition == "silo" and self.silo is None:
                raise ValueError("partition 'silo' needs the silo column: set data.silo")
        else:
            given = [f for f in fields if getattr(self, f) is not None] + (["categorical"] if self.categorical else [])
            if given:
                raise ValueError(f"{', '.join(given)}: only for dataset 'tabular', got dataset {self.dataset!r}")
        return self


class ModelConfig(Strict):
    name: str = "cnn"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        MODELS.get(v)
        return v


class DPSGDConfig(Strict):
    """Client-side DP-SGD through Opacus (Abadi et al. 2016): per-sample clipping and noise."""

    noise_multiplier: float | None = Field(None, gt=0, description="sigma / max_grad_norm")
    target_epsilon: float | None = Field(None, gt=0, description="derive the noise for this epsilon over the run")
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        return self


class FederationConfig(Strict):
    num_clients: int = Field(20, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description="default: all clients")
    rounds: int = Field(30, ge=1)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="cap on local SGD steps per round")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="client SGD momentum (heavy ball, PyTorch's rule)")
    client_momentum: bool = Field(
        False, description="worker momentum: each client keeps its momentum buffer across rounds (Karimireddy "
        "et al. 2021), so momentum acts even with one local step; the simulator holds num_clients x d floats")
    weight_decay: float = Field(0.0, ge=0)
    server_lr: float = Field(1.0, gt=0)
    weighting: Literal["samples", "uniform"] = "samples"
    engine: Literal["sequential", "vectorized"] = Field(
        "vectorized", description="local training all clients at once (torch.func), or one at a time")
    eval_every: int = Field(1, ge=1)
    dp_sgd: DPSGDConfig | None = Field(None, description="every client trains with DP-SGD (Opacus), except an attacker in a round it attacks")
    signing: bool = Field(False, description="clients sign their updates (ECDSA P-256); pair with "
                                             "the 'verify' defense layer")
    recovery_drop: float | None = Field(None, gt=0, le=1, description="roll back a round when server "
                                        "validation accuracy drops by more than this")
    server_data: int = Field(0, ge=0, description="clean training samples held out for the server "
                                                  "(FLTrust's root set, reputation's validation loss)")

    @model_validator(mode="after")
    def _sampled(self):
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round must be <= num_clients ({self.num_clients}), "
                             f"got {self.clients_per_round}")
        if self.momentum and self.local_steps == 1 and not self.client_momentum:
            raise ValueError(f"momentum={self.momentum} has no effect with local_steps=1: a client's momentum "
                             "restarts every round; set client_momentum: true to keep it across rounds, or momentum: 0")
        if self.client_momentum and not self.momentum:
            raise ValueError("client_momentum needs momentum > 0, got momentum=0 (it would keep nothing)")
        if self.client_momentum and self.dp_sgd is not None:
            raise ValueError("client_momentum is not supported with dp_sgd (Opacus trains without a kept "
                             "momentum buffer): turn one of them off")
        return self


class AttackConfig(Strict):
    name: str | None = Field(None, description="model-poisoning attack (see `phalanx list`)")
    params: dict[str, Any] = Field(default_factory=dict)
    byzantine: float = Field(0, ge=0, description="number of Byzantine clients, or a fraction < 1")
    poison: str | None = Field(None, description="data poison applied in local training")
    poison_params: dict[str, Any] = Field(default_factory=dict)
    rounds: Union[list[int], str, None] = Field(
        None, description="rounds the attack is active: all (null), a list, or 'start:stop'")

    @field_validator("name")
    @classmethod
    def _known_attack(cls, v):
        if v is not None:
            ATTACKS.get(v)
        return v

    @field_validator("poison")
    @classmethod
    def _known_poison(cls, v):
        if v is not None:
            POISONS.get(v)
        return v

    @field_validator("rounds")
    @classmethod
    def _window(cls, v):
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"a round window must look like 'start:stop', got {v!r}")
        return v

    def active(self, rnd: int) -> bool:
        if self.rounds is None:
            return True
        if isinstance(self.rounds, str):
            a, b = (int(p) for p in self.rounds.split(":"))
            return a <= rnd < b
        return rnd in self.rounds


DefenseItem = Union[str, dict[str, Union[dict[str, Any], None]]]


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    defense: list[DefenseItem] = Field(default_factory=lambda: ["mean"])
    defense_f: Union[StrictInt, StrictFloat, Literal["auto"]] = Field(
        "auto", description="the server's own guess of the Byzantine count among a round's rows, given to "
        "every f-parametrised stage: a count, a fraction < 1 of the round's clients, or 'auto' = "
        "floor((n - 3) / 4), the largest f that every rule accepts (Bulyan needs n >= 4f + 3). Never the "
        "attack's true count.")
    plugins: list[str] = Field(
        default_factory=list, description="your own modules, imported before any name is resolved: .py files "
        "(relative to this file's folder) or dotted module names (see phalanx.plugins)")

    @field_validator("defense_f")
    @classmethod
    def _f_guess(cls, v):
        if isinstance(v, bool) or (not isinstance(v, str) and v < 0):
            raise ValueError(f"a count >= 0, a fraction < 1 or 'auto', got {v!r}")
        if isinstance(v, float) and v >= 1 and not v.is_integer():
            raise ValueError(f"a fraction must be < 1 (or give a whole count), got {v!r}")
        return v

    def server_f(self) -> int:
        """The f the server assumes for a round of ``clients_per_round`` (or all) clients."""
        k = self.federation.clients_per_round or self.federation.num_clients
        v = self.defense_f
        if v == "auto":
            return max(0, (k - 3) // 4)
        if isinstance(v, float) and v < 1:
            return int(round(v * k))
        if v > k:
            raise ConfigError(f"defense_f: at most the {k} clients of a round, got {v}")
        return int(v)

    @field_validator("defense")
    @classmethod
    def _known_defenses(cls, items):
        if not items:
            raise ValueError("needs at least one stage (an aggregator such as 'mean')")
        for item in items:
            name, _ = defense_item(item)
            DEFENSES.get(name)
        return items

    def num_byzantine(self) -> int:
        b, n = self.attack.byzantine, self.federation.num_clients
        count = round(b * n) if b < 1 else int(b)
        if count > n:
            raise ConfigError(f"attack.byzantine: at most num_clients ({n}), got {b}")
        return count


def defense_item(item: DefenseItem) -> tuple[str, dict[str, Any]]:
    """('krum', {'f': 3}) from 'krum' or {'krum': {'f': 3}}."""
    if isinstance(item, str):
        return item, {}
    if len(item) != 1:
        raise ValueError(f"each defense entry is a name or {{name: {{params}}}}, got {item!r}")
    (name, params), = item.items()
    return name, dict(params or {})


# ------------------------------------------------------------------ loading and overrides


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "config"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"{path}: unknown key; allowed: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        given_s = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{path}: {msg}{given_s}")
    return "invalid config: " + "; ".join(dict.fromkeys(lines))


def parse_config(data: dict[str, Any], base: str | Path | None = None) -> ExperimentConfig:
    """A validated ExperimentConfig from a mapping. Its ``plugins`` (and the installed entry points)
    are imported first, so their names resolve; relative plug-in paths are taken from ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: expected a mapping at the top level, got {type(data).__name__}")
    data = with_plugins(data, base)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set: empty key in {item!r}")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a file, with one clear error for a missing file, bad YAML or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def with_plugins(data: dict[str, Any], base: str | Path | None = None, extra: list[str] | None = None
                 ) -> dict[str, Any]:
    """Import the plug-ins a raw config names (``plugins``, relative to ``base``) and ``extra`` ones
    (relative to the current folder); the config with every plug-in resolved, in ``plugins``."""
    from .plugins import activate

    listed = data.get("plugins", [])
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        activate([])  # entry points only; validation reports the bad field
        return data
    resolved = list(dict.fromkeys([*activate(listed, base), *activate(extra)]))
    return {**data, "plugins": resolved} if resolved or "plugins" in data else data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                plugins: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults when path is None) and apply overrides; ``plugins``
    (from ``--plugin``, relative to the current folder) join the config's own."""
    data = read_yaml(path) if path is not None else {}
    base = Path(path).parent if path is not None else None
    return parse_config(with_plugins(apply_overrides(data, overrides or []), base, plugins), base)
