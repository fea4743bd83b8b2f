"""``tbps train --config FILE``: YAML or JSON options, command-line options winning, and re-running a recorded ``run.json``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tbps.models.adapters import WEIGHTS_FILE
from tbps.train import loop
from tbps.train.loop import TrainConfig, TrainResult

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--model", "tbps-tiny", "--data", "pairs.csv", "--adapter", "lora", "--lora-alpha", "32", "--targets", "c_fc",
         "--targets", "c_proj", "--steps", "3", "--batch-size", "8", "--device", "cpu"]
YAML = """\
# the same options as FLAGS, with - and _ both
model: tbps-tiny
data: pairs.csv
adapter: lora
lora_alpha: 32
targets: [c_fc, c_proj]
steps: 3
batch-size: 8
--device: cpu
"""


@pytest.fixture
def captured(monkeypatch) -> list[TrainConfig]:
    """The TrainConfig each ``tbps train`` builds; no training runs."""
    seen: list[TrainConfig] = []

    def fake_train(config, progress=None, log=None):
        seen.append(config)
        return TrainResult(run=Path(config.out), steps=0, pairs_seen=0, train_seconds=0.0, final_loss=0.0, trainable=0, total=1,
                           result_checkpoint="last", rank=1)  # rank 1: nothing printed

    monkeypatch.setattr(loop, "train", fake_train)
    return seen


def _config(cli, captured, *args) -> TrainConfig:
    res = cli("train", *args)
    assert res.exit_code == 0, res.output
    return captured[-1]


def test_a_yaml_or_json_file_gives_the_same_config_as_the_flags(cli, captured, tmp_path):
    from_flags = _config(cli, captured, "--out", tmp_path / "run", *FLAGS)
    assert (from_flags.adapter, from_flags.lora_alpha, from_flags.targets, from_flags.batch_size) == ("lora", 32.0, ["c_fc", "c_proj"], 8)
    (tmp_path / "train.yaml").write_text(YAML)
    from_yaml = _config(cli, captured, "--config", tmp_path / "train.yaml", "--out", tmp_path / "run")
    assert asdict(from_yaml) == asdict(from_flags)
    (tmp_path / "train.json").write_text(json.dumps({"model": "tbps-tiny", "data": "pairs.csv", "adapter": "lora", "lora-alpha": 32,
                                                     "targets": "c_fc,c_proj", "steps": 3, "batch_size": 8, "device": "cpu",
                                                     "out": str(tmp_path / "run")}))
    assert asdict(_config(cli, captured, "--config", tmp_path / "train.json")) == asdict(from_flags)  # --out from the file too


def test_the_command_line_wins_over_the_file(cli, captured, tmp_path):
    (tmp_path / "train.yaml").write_text(YAML)
    cfg = _config(cli, captured, "--config", tmp_path / "train.yaml", "--out", tmp_path / "run", "--lr", "0.5", "--targets", "attn",
                  "--epochs", "2", "--manifest", "m.parquet")
    assert cfg.lr == 0.5 and cfg.targets == ["attn"] and cfg.lora_alpha == 32.0 and cfg.batch_size == 8
    # The other side of an exclusive pair given in the file gives way: --epochs over steps, --manifest over data.
    assert (cfg.epochs, cfg.steps, cfg.manifest, cfg.data) == (2, None, "m.parquet", None)
    assert _config(cli, captured, "--out", tmp_path / "run", "--lr", "0.5", "--config", tmp_path / "train.yaml").lr == 0.5  # order does not matter


@pytest.mark.parametrize(
    ("content", "name", "code", "message"),
    [
        ("model: tbps-tiny\nlearning_rate: 0.1\n", "a.yaml", 2, "unknown key 'learning_rate' (not an option of tbps train)"),
        ("model: tbps-tiny\nbatch_sise: 8\n", "a.yaml", 2, "Did you mean 'batch_size'?"),
        ('{"config": "other.yaml"}', "a.json", 2, "unknown key 'config'"),
        ("model: [unclosed\n", "a.yaml", 1, "cannot read config file"),
        ("- model\n- tbps-tiny\n", "a.yaml", 1, "a config file holds a mapping of option names to values (found 'list')"),
        ("model = 'tbps-tiny'\n", "a.toml", 1, "a config file is YAML or JSON"),
        ("lr: fast\n", "a.yaml", 2, "Invalid value for '--lr'"),
    ],
)
def test_bad_config_files_are_one_clear_error(cli, captured, tmp_path, content, name, code, message):
    (tmp_path / name).write_text(content)
    res = cli("train", "--config", tmp_path / name, "--out", tmp_path / "run", "--data", "pairs.csv", "--model", "tbps-tiny")
    assert res.exit_code == code, res.output
    assert message in " ".join(res.output.replace("│", " ").split()), res.output
    assert not captured


@pytest.fixture(scope="module")
def recorded(cli, synth_world, tmp_path_factory) -> Path:
    """A real 2-step LoRA run of tbps-tiny."""
    run = tmp_path_factory.mktemp("recorded") / "run"
    res = cli("train", "--data", synth_world(0) / "benchmark" / "reid_raw.json", "--out", run, "--model", "tbps-tiny", "--adapter", "lora",
              "--targets", "c_fc", "--steps", "2", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--device", "cpu",
              "--warmup", "1", "--lr", "3e-3", "--quiet")
    assert res.exit_code == 0, res.output
    return run


def test_a_run_record_gives_back_the_recorded_config(cli, captured, recorded, tmp_path):
    record = json.loads((recorded / "run.json").read_text())
    for given in (recorded / "run.json", recorded):  # the record, or the run directory
        cfg = _config(cli, captured, "--config", given, "--out", tmp_path / "again")
        assert loop._plain(cfg) == {**record["config"], "out": str(tmp_path / "again")}
    # --steps overrides the record's resolved epochs (a recorded run always has one of them).
    cfg = _config(cli, captured, "--config", recorded / "run.json", "--out", tmp_path / "again", "--steps", "5")
    assert (cfg.steps, cfg.epochs, cfg.adapter, cfg.targets) == (5, None, "lora", ["c_fc"])


def test_a_recorded_output_directory_is_reused_only_while_it_is_free(cli, captured, recorded, tmp_path):
    res = cli("train", "--config", recorded / "run.json")
    assert res.exit_code == 2 and "is not free: give --out for the re-run" in " ".join(res.output.replace("│", " ").split()), res.output
    # --resume continues the recorded run in its own directory.
    cfg = _config(cli, captured, "--config", recorded / "run.json", "--resume")
    assert cfg.out == str(recorded) and cfg.resume
    # A record whose directory is gone re-runs there.
    record = json.loads((recorded / "run.json").read_text())
    record["config"]["out"] = str(tmp_path / "moved")
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert _config(cli, captured, "--config", tmp_path / "run.json").out == str(tmp_path / "moved")


def test_re_running_a_recorded_run_reproduces_it(cli, recorded, tmp_path):
    res = cli("train", "--config", recorded / "run.json", "--out", tmp_path / "again", "--quiet")
    assert res.exit_code == 0, res.output
    a, b = (load_file(r / "last" / WEIGHTS_FILE) for r in (recorded, tmp_path / "again"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # CPU, fp32, same seed: the same weights
    again = json.loads((tmp_path / "again" / "run.json").read_text())["config"]
    assert again == {**json.loads((recorded / "run.json").read_text())["config"], "out": str(tmp_path / "again")}
