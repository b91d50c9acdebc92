"""Job config validation: bad keys and values fail with the key's name, before any worker."""

from __future__ import annotations

import pytest

from jobs.cli import build_parser, resolve_config
from jobs.train_cmd import config_from_args
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


SHIPPED_TRAIN_CONFIGS = sorted(
    p.stem
    for p in __import__("jobs.cli").cli.CONFIG_DIR.glob("*.yaml")
    if not p.stem.startswith(("ingest_", "tune_"))
)


@pytest.fixture
def fake_ingest_output(tmp_path):
    """What the plan reads of an ingest output: its stats.json (no data pass is needed)."""
    out = tmp_path / "processed"
    out.mkdir()
    (out / "stats.json").write_text('{"written": 100000}')
    return str(out)


@pytest.mark.parametrize("name", SHIPPED_TRAIN_CONFIGS)
def test_every_shipped_config_plans_before_ray(name, fake_ingest_output, tmp_path):
    """Model config, task, data transforms and the plan of every shipped job, with no Ray."""
    from pipelines.train.launch import describe_plan, plan_run

    job = load_config(resolve_config(name), {"data.uris": [fake_ingest_output], "run.storage": str(tmp_path)})
    if job.model.init is not None:  # finetuning configs name a placeholder to start from
        job = job.model_copy(update={"model": job.model.model_copy(update={"init": None})})
    plan = plan_run(job)
    assert plan.total_steps > 0 and plan.flops_per_sample > 0
    text = describe_plan(plan)
    assert f"task {job.task!r}" in text and "GFLOP" in text and "global" in text


def test_dry_run_prints_the_plan_and_starts_nothing(fake_ingest_output, tmp_path, capsys):
    from jobs.cli import main

    code = main(["train", "--task", "pretrain", "--config", "pretrain_large", "--data", fake_ingest_output,
                 "--storage", str(tmp_path), "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "preset large" in out and "224 px" in out and "training from scratch" in out
    assert not any(tmp_path.glob("pretrain-large*"))  # no run folder: nothing started


def test_cli_errors_are_one_line(tmp_path, capsys):
    from jobs.cli import main

    assert main(["pretrain", "--config", "pretrain_tinyy", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and "YAML" not in err
    code = main(["pretrain", "--config", "pretrain_tiny", "--data", "nosuch://bucket/x", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "unsupported storage URI" in err


def test_finetune_requires_weights_to_start_from(fake_ingest_output):
    from pipelines.tasks import TASKS

    finetune_tasks = [t for t in TASKS if t != "pretrain"]
    if not finetune_tasks:
        pytest.skip("no finetuning task registered")
    args = build_parser().parse_args(["finetune", "--task", finetune_tasks[0], "--data", fake_ingest_output])
    with pytest.raises(ConfigError, match="--init"):
        config_from_args(args)


def test_help_lists_only_commands_that_exist(capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    registered = set(build_parser()._subparsers._group_actions[0].choices)
    for command in ("env", "synth", "ingest", "train", "finetune", "pretrain", "tune", "evaluate", "infer",
                    "submit", "jobs", "demo"):  # fmt: skip
        # argparse lists a command at 4 spaces; wrapped help text continues deeper.
        listed = any(line[4:].split()[:1] == [command] and line[:4] == "    " and line[4] != " "
                     for line in help_text.splitlines())  # fmt: skip
        assert listed == (command in registered), command
