"""Every job's config is built one way (corrdiff.typed_config): YAML, then flags, validated
strictly. Why: a typo in a config file or a flag must stop a job before any work, saying
which key and which file, not be ignored or coerced into something else."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from corrdiff.config import ModelConfig
from corrdiff.trainer import TrainConfig
from corrdiff.typed_config import ConfigError, load_config, parse_config
from pipeline.audit import AuditConfig
from pipeline.cli import COMMANDS, main
from pipeline.compress import CompressConfig
from pipeline.evaluate import EvaluateConfig
from pipeline.restore_archive import RestoreConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [("compress.yaml", CompressConfig), ("audit.yaml", AuditConfig), ("restore.yaml", RestoreConfig),
           ("evaluate.yaml", EvaluateConfig)] + [
    (f"train/{path.name}", TrainConfig) for path in sorted((ROOT / "configs" / "train").glob("*.yaml"))]


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.filterwarnings("ignore:.*px crops give a hyper-latent")  # the smaller crops of earlier runs
@pytest.mark.parametrize("name, cls", SHIPPED, ids=[name for name, _ in SHIPPED])
def test_each_shipped_config_loads(name: str, cls: type) -> None:
    config = load_config(cls, str(ROOT / "configs" / name))
    assert isinstance(config, cls)


def test_shipped_configs_show_the_defaults() -> None:
    """configs/compress.yaml says its values are the embedded defaults: the file and the
    dataclass agree on everything but the two required keys."""
    from_file = load_config(CompressConfig, str(ROOT / "configs" / "compress.yaml"))
    assert from_file == CompressConfig(input=type(from_file.input)(url=from_file.input.url), output=from_file.output)


def test_an_unknown_key_is_named_with_its_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "input: {url: in}\noutput: out\ncodec: {gamma_metrc: dists}\n")
    with pytest.raises(ConfigError, match=f"{path}: codec.gamma_metrc: unknown key"):
        load_config(CompressConfig, path)


def test_an_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "archive: a\nreport: r\nthreshold: {error_rate: {max: 0.1}}\n")
    with pytest.raises(ConfigError, match=f"{path}: threshold: unknown key"):
        load_config(AuditConfig, path)


@pytest.mark.parametrize("text, key", [
    ("codec: {seed: '3'}", "codec.seed"),  # a string is not an integer, even one that reads as one
    ("codec: {steps: 2.5}", "codec.steps"),  # nor a float
    ("allow_config_change: 'yes please'", "allow_config_change"),
    ("resources: {actor_batch_size: [4]}", "resources.actor_batch_size"),
    ("input: {url: in, kind: zip}", "input.kind"),
])
def test_a_value_of_the_wrong_type_is_named(tmp_path: Path, text: str, key: str) -> None:
    path = _yaml(tmp_path, f"input: {{url: in}}\noutput: out\n{text}\n")
    with pytest.raises(ConfigError, match=f"{path}: {key}: "):
        load_config(CompressConfig, path)


def test_lists_become_tuples_and_integers_floats(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "images: i\nmodel: m\nmodes: [e2e]\ncurve_qualities: [10, 20]\ngamma_learning_rate: 1\n")
    config = load_config(EvaluateConfig, path)
    assert config.modes == ("e2e",) and config.curve_qualities == (10, 20)
    assert config.gamma_learning_rate == 1.0 and isinstance(config.gamma_learning_rate, float)


def test_a_dataclass_check_is_reported_with_its_section(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "input: {url: in}\noutput: out\nfloor: {psnr: 30, fallback: webp}\n")
    with pytest.raises(ConfigError, match=f"{path}: floor: floor.fallback 'webp' is not one of"):
        load_config(CompressConfig, path)


def test_flags_override_the_file_and_extend_its_lists(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "archive: a\nreport: r\nseed: 4\nmodel_stores: [s3://one/]\nstorage: {region: eu}\n")
    config = load_config(AuditConfig, path, {"seed": 9, "report": None, "storage.endpoint_url": "http://x"},
                         extend={"model_stores": ["s3://two/"]})
    assert config.seed == 9 and config.report == "r"  # None: the flag was not given
    assert config.storage.endpoint_url == "http://x" and config.storage.region == "eu"  # a section merged, not replaced
    assert config.model_stores == ("s3://one/", "s3://two/")


def test_a_bad_flag_value_is_blamed_on_the_command_line(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "input: {url: in}\noutput: out\n")
    with pytest.raises(ConfigError, match="the command line: codec.seed: Input should be a valid integer"):
        load_config(CompressConfig, path, {"codec.seed": "3"})


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output: required"):
        load_config(CompressConfig, _yaml(tmp_path, "input: {url: in}\n"))
    with pytest.raises(ConfigError, match="the command line: report: required"):
        load_config(AuditConfig, None, {"archive": "a"})


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "expected a mapping"), ("a: [b\n", "not valid YAML")])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CompressConfig, _yaml(tmp_path, text))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(CompressConfig, str(tmp_path / "nope.yaml"))


def test_training_phases_and_model_are_validated_too(tmp_path: Path) -> None:
    base = "name: n\ndata: d\noutput: o\nlmbda: 0.01\n"
    config = load_config(TrainConfig, _yaml(tmp_path, base + "phases: [{phase: 1, steps: 2, lr: 1.0e-4}]\n"
                                           "model: {score: {channel_mults: [1, 2]}}\n"), {"max_seconds": 30.0})
    assert config.phases[0].steps == 2 and config.model.score.channel_mults == (1, 2) and config.max_seconds == 30.0
    with pytest.raises(ConfigError, match=r"phases\.0\.stpes: unknown key"):
        load_config(TrainConfig, _yaml(tmp_path, base + "phases: [{phase: 1, stpes: 2, lr: 1.0e-4}]\n"))
    with pytest.raises(ConfigError, match=r"model\.latent\.channels: unknown key"):
        load_config(TrainConfig, _yaml(tmp_path, base + "phases: []\nmodel: {latent: {channels: 3}}\n"))


def test_a_model_config_from_a_weights_file_is_strict_too() -> None:
    assert ModelConfig.from_json(ModelConfig().to_json()) == ModelConfig()
    with pytest.raises(ConfigError, match="model config: decoder_channels: Input should be a valid integer"):
        parse_config(ModelConfig, {"decoder_channels": "128"}, "model config")


def test_every_command_exits_2_on_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before any work (no Ray started, nothing read): the key and the file on stderr."""
    path = _yaml(tmp_path, "bogus: 1\n")
    flags = {"compress": [], "restore": [], "audit": [], "train": [], "evaluate": []}
    assert set(flags) == set(COMMANDS)
    for command, extra in flags.items():
        assert main([command, "--config", path, *extra]) == 2, command
        assert f"{command}: invalid" in (err := capsys.readouterr().err) and f"{path}: bogus: unknown key" in err


def test_the_console_script_is_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["corrdiff-archive"].partition(":")
    assert (module, function) == ("pipeline.cli", "main")
