"""A grid's YAML, validated: the axes (datasets, partitions, byzantine fractions, attacks, defenses,
seeds, guesses of f), the leakage audit's settings and the user's plug-ins. :mod:`phalanx.bench` expands
and runs it; :mod:`phalanx.bench_privacy` plans its leakage audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import DefenseItem, apply_overrides, read_yaml
from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PartitionSpec(_Strict):
    partition: Literal["iid", "dirichlet", "shards", "silo"] = "iid"
    alpha: float | None = Field(None, gt=0)
    shards_per_client: int | None = Field(None, ge=1)

    def label(self) -> str:
        arg = {"dirichlet": self.alpha, "shards": self.shards_per_client}.get(self.partition)
        return f"{self.partition}({arg:g})" if arg is not None else self.partition


class AttackSpec(_Strict):
    family: Literal["random", "adaptive", "backdoor", "malformed", "none"]
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    poison: str | None = None
    poison_params: dict[str, Any] = Field(default_factory=dict)
    rounds: Union[list[int], str, None] = None
    federation: dict[str, Any] = Field(default_factory=dict, description="federation overrides")


class DefenseSpec(_Strict):
    stages: list[DefenseItem] = Field(min_length=1)
    federation: dict[str, Any] = Field(default_factory=dict, description="e.g. signing, server_data")


class PrivacySpec(_Strict):
    seeds: int = Field(3, ge=1)
    steps: int = Field(200, ge=1)
    attack: Literal["idlg", "dlg", "ig"] = "idlg"
    dataset: str = "fashion-mnist"


class GridSpec(_Strict):
    name: str = "grid"
    base: dict[str, Any] = Field(default_factory=dict)
    datasets: list[str] | None = Field(None, min_length=1)
    partitions: list[PartitionSpec] | None = Field(None, min_length=1)
    byzantine: list[float] | None = Field(None, min_length=1)
    attacks: dict[str, AttackSpec] = Field(min_length=1)
    defenses: dict[str, DefenseSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    defense_f: list[Union[int, float, Literal["auto"]]] | None = Field(
        None, min_length=1, description="the server's guesses of f; with several, each defense that uses f "
        "gets one row per guess, labelled 'DEFENSE f=GUESS'")
    workers: int = Field(1, ge=1)
    baseline: str | None = Field(None, description="defense label of the reference (default: [mean])")
    privacy: PrivacySpec | None = None
    plugins: list[str] = Field(default_factory=list, description="your own modules (.py files relative to the grid "
                               "file, or dotted names), imported before names resolve, in every worker too")

    @field_validator("defenses", mode="before")
    @classmethod
    def _lists(cls, v):
        if isinstance(v, dict):
            return {k: {"stages": d} if isinstance(d, list) else d for k, d in v.items()}
        return v

    @field_validator("byzantine")
    @classmethod
    def _fractions(cls, v):
        if v is not None and any(b < 0 for b in v):
            raise ValueError(f"every fraction (or count) must be >= 0, got {v}")
        return v

    def baseline_label(self) -> str | None:
        if self.baseline is not None:
            return self.baseline
        return next((k for k in self.defenses if self.defenses[k].stages == ["mean"]), None)


_MODELS = {"attacks": AttackSpec, "defenses": DefenseSpec, "privacy": PrivacySpec, "partitions": PartitionSpec}


def _format(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc) or "grid"
        if err["type"] == "extra_forbidden":
            model = GridSpec if len(loc) == 1 else _MODELS.get(loc[0], GridSpec)
            out.append(f"{path}: unknown key; allowed: {', '.join(model.model_fields)}")
        elif err["type"] == "missing":
            out.append(f"{path}: required")
        else:
            given = err.get("input")
            out.append(f"{path}: {err['msg'].removeprefix('Value error, ')}"
                       + ("" if isinstance(given, dict) else f" (got {given!r})"))
    return "invalid grid: " + "; ".join(dict.fromkeys(out))


def parse_grid(data: Any, name: str | None = None, base: str | Path | None = None,
               plugins: list[str] | None = None) -> GridSpec:
    """A validated GridSpec from a mapping; unknown keys, bad labels and bad cells raise ConfigError.

    The grid's ``plugins`` (relative to ``base``), its base config's and ``plugins`` (from
    ``--plugin``, relative to the current folder) are imported first and written, resolved, into
    the base config, so that every cell's config (and every worker process) imports them too."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid grid: expected a mapping at the top level, got {type(data).__name__}")
    data = _with_plugins(dict(data), base, plugins)
    if name and "name" not in data:
        data["name"] = name
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    for label, a in spec.attacks.items():
        if a.family == "none" and (a.name or a.poison):
            raise ConfigError(f"attacks.{label}: family 'none' takes no name or poison, got "
                              f"name={a.name!r}, poison={a.poison!r}")
        if a.family != "none" and not (a.name or a.poison):
            raise ConfigError(f"attacks.{label}: family {a.family!r} needs a name or a poison, got neither")
    if not any(a.family == "none" for a in spec.attacks.values()):
        spec.attacks = {"none": AttackSpec(family="none"), **spec.attacks}
    base = spec.baseline_label()
    if spec.baseline is not None and base not in spec.defenses:
        raise ConfigError(f"baseline: must be a defense label ({', '.join(spec.defenses)}), got {base!r}")
    return spec


def load_grid(path: str | Path, overrides: list[str] | None = None, plugins: list[str] | None = None) -> GridSpec:
    """Read a grid YAML file and apply ``--set key.sub=value`` overrides; ``plugins`` join the grid's own."""
    return parse_grid(apply_overrides(read_yaml(path, "grid"), overrides or []), name=Path(path).stem,
                      base=Path(path).parent, plugins=plugins)


def _with_plugins(data: dict, base: str | Path | None, extra: list[str] | None) -> dict:
    from .config import with_plugins

    cfg, own = data.get("base"), data.get("plugins", [])
    inner = cfg.get("plugins", []) if isinstance(cfg, dict) else []
    if not isinstance(own, list) or not isinstance(inner, list) or not (cfg is None or isinstance(cfg, dict)):
        return data  # validation names the bad field
    resolved = with_plugins({"plugins": [*own, *inner]}, base, extra)["plugins"]
    if resolved:
        data["plugins"] = resolved
        data["base"] = {**(cfg or {}), "plugins": resolved}
    return data
