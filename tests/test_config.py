import pytest

from phalanx.config import apply_overrides, load_config, parse_config
from phalanx.errors import ConfigError


def test_defaults_and_overrides(tiny_config):
    cfg = parse_config(apply_overrides(tiny_config, ["federation.rounds=7", "attack.byzantine=0.5",
                                                      "data.partition=dirichlet", "defense=[median]"]))
    assert cfg.federation.rounds == 7 and cfg.num_byzantine() == 3
    assert cfg.data.partition == "dirichlet" and cfg.defense == ["median"]


def test_misspelt_key_lists_allowed(tiny_config):
    tiny_config["federation"]["rouds"] = 3
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config)
    msg = str(e.value)
    assert "federation.rouds: unknown key" in msg and "rounds" in msg and "\n" not in msg


def test_wrong_type_and_range(tiny_config):
    with pytest.raises(ConfigError, match=r"federation.rounds: .*greater than or equal to 1 \(got -2\)"):
        parse_config(apply_overrides(tiny_config, ["federation.rounds=-2"]))
    with pytest.raises(ConfigError, match=r"federation.lr: .*number.*\(got 'fast'\)"):
        parse_config(apply_overrides(tiny_config, ["federation.lr=fast"]))
    with pytest.raises(ConfigError, match="data.partition: .*'iid', 'dirichlet', 'shards' or 'silo'"):
        parse_config(apply_overrides(tiny_config, ["data.partition=noniid"]))


def test_unknown_names_suggest(tiny_config):
    with pytest.raises(ConfigError, match="unknown model 'cnnn'.*did you mean 'cnn'"):
        parse_config(apply_overrides(tiny_config, ["model.name=cnnn"]))
    with pytest.raises(ConfigError, match="unknown defense 'krumm'"):
        parse_config(apply_overrides(tiny_config, ["defense=[krumm]"]))
    with pytest.raises(ConfigError, match="unknown dataset"):
        parse_config(apply_overrides(tiny_config, ["data.dataset=imagenet"]))


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["rounds"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_clients_per_round_bound(tiny_config):
    with pytest.raises(ConfigError, match="clients_per_round must be <= num_clients"):
        parse_config(apply_overrides(tiny_config, ["federation.clients_per_round=10"]))


def test_shipped_configs_parse():
    from pathlib import Path

    paths = [p for p in sorted(Path(__file__).parent.parent.glob("configs/*.yaml")) if "grid" not in p.name]
    assert len(paths) >= 2
    for path in paths:
        cfg = load_config(path)  # raises ConfigError on any mistake
        assert cfg.name and cfg.defense
