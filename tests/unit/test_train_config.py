"""Job config validation: bad keys and values fail with the key's name, before any worker."""

from __future__ import annotations

import pytest

from jobs.cli import build_parser
from jobs.pretrain_cmd import config_from_args, resolve_config
from pipelines.train.config import ConfigError, load_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["pretrain_tiny", "pretrain_base", "pretrain_large"])
def test_shipped_configs_validate(name):
    job = load_config(resolve_config(name))
    assert job.model.preset == name.split("_")[1]


def test_base_config_is_the_official_recipe():
    job = load_config(resolve_config("pretrain_base"))
    assert job.optim.weight_decay == 0.02
    assert (job.optim.lr, job.optim.visual_lr, job.optim.min_lr) == (1e-4, 1e-5, 1e-6)
    assert job.data.image_size == 256
    assert job.run.epochs == 30
    assert job.data.batch_size * job.scaling.num_workers == 256


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  learning_rat: 3\nrun:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rat"):
        load_config(str(path))


def test_wrong_type_names_the_key_and_value(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  batch_size: lots\nrun:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size.*'lots'"):
        load_config(str(path))


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, {"scaling.num_workers": [4, 2], "run.max_steps": 3})
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, {"run.name": "bad name/with slash", "run.max_steps": 3})
    with pytest.raises(ConfigError, match="max_steps or epochs"):
        load_config(None, {"run": {"name": "x"}})


def test_cli_flags_override_yaml():
    args = build_parser().parse_args(
        [
            "pretrain",
            "--config",
            "pretrain_tiny",
            "--data",
            "s3://b/a",
            "--data",
            "s3://b/b",
            "--num-workers",
            "2,4",
            "--max-steps",
            "7",
            "--set",
            "optim.warmup_steps=3",
            "--no-use-gpu",
        ]
    )
    job = config_from_args(args)
    assert job.data.uris == ["s3://b/a", "s3://b/b"]
    assert job.scaling.num_workers == (2, 4)
    assert job.run.max_steps == 7
    assert job.optim.warmup_steps == 3
    assert job.scaling.use_gpu is False


def test_bad_set_syntax():
    args = build_parser().parse_args(["pretrain", "--set", "noequals"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_from_args(args)
