"""The `mplug` command as a newcomer meets it: every flag explains itself and shows its default,
every command ends with examples that parse, and a wrong or misplaced config is refused before
anything starts, in one line that says what to pass instead (exit 2; other errors exit 1)."""

from __future__ import annotations

import argparse
import shlex
from importlib.metadata import version

import pytest

from jobs.cli import HelpFormatter, build_parser, error_line, main
from pipelines.train.config import ConfigError, check_placeholders

pytestmark = pytest.mark.unit


def all_parsers(parser: argparse.ArgumentParser, path: str = "mplug"):
    """(command path, parser) for the top level and every subcommand, nested ones included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from all_parsers(child, f"{path} {name}")


PARSERS = dict(all_parsers(build_parser()))
COMMANDS = {path: p for path, p in PARSERS.items() if not any(
    isinstance(a, argparse._SubParsersAction) for a in p._actions) and path != "mplug"}  # fmt: skip


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect a config error: exit 2 and one line on stderr; returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture
def no_ray(monkeypatch):
    """Refusals must come before Ray starts: starting it fails the test."""
    import pipelines.cluster

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the command's checks")

    monkeypatch.setattr(pipelines.cluster, "init_ray", started)


@pytest.fixture
def ingest_output(tmp_path):
    """What a plan reads of an ingest output: its stats.json."""
    out = tmp_path / "processed"
    out.mkdir()
    (out / "stats.json").write_text('{"written": 1000}')
    return str(out)


# ---- help -----------------------------------------------------------------------------------------
def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "env" in out and "demo" in out


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_every_flag_has_help_that_shows_its_default(path):
    parser = PARSERS[path]
    formatter = HelpFormatter(prog=path)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{path} {name}: no help text"
        if action.option_strings and not action.required:  # "required" when a config may give it
            shown = formatter._get_help_string(action)
            assert "default" in shown or "(required" in shown, f"{path} {name}: help shows no default"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_ends_with_examples_that_parse(path, capsys):
    parser = COMMANDS[path]
    assert parser.formatter_class is HelpFormatter
    epilog = parser.epilog or ""
    assert epilog.startswith("examples:"), f"{path}: no examples at the end of its help"
    examples = [line.strip() for line in epilog.splitlines()[1:] if line.strip()]
    assert 1 <= len(examples) <= 3  # one or two; a third where a command reads another kind of input
    for example in examples:
        words = shlex.split(example)
        assert words[0] == "mplug" and " ".join(words[1 : len(path.split())]) == path[len("mplug ") :]
        args = build_parser().parse_args(words[1:])  # a bad flag exits here
        for flag, kind in (("config", "train"), ("space", "space")):
            value = getattr(args, flag, None)
            if value is not None:  # shipped names in examples exist and fit the command
                from jobs.cli import check_config

                kind = "ingest" if args.command == "ingest" and flag == "config" else kind
                task = None if kind == "ingest" else getattr(args, "fixed_task", None) or args.task
                check_config(value, kind, task=task)
    # The examples are printed as written (one command per line), after the options.
    with pytest.raises(SystemExit):
        build_parser().parse_args([*path.split()[1:], "--help"])
    out = capsys.readouterr().out
    assert out.rstrip().endswith(examples[-1])


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mplug {version('mplug-ray')}"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["nope"], "mplug: error: argument COMMAND: invalid choice: 'nope'"),
        (
            ["pretrain", "--bogus"],
            "mplug pretrain: error: unrecognized arguments: --bogus (see `mplug pretrain --help`)",
        ),
        (
            ["train", "--config", "pretrain_tiny"],
            "mplug train: error: the following arguments are required: --task",
        ),
        (["jobs", "logs"], "mplug jobs logs: error: the following arguments are required: ID"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_help_to_read(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and says in err and "--help`)" in err


# ---- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, closest",
    [
        (["ingest", "--config", "ingest_coco"], "ingest_coco_json"),
        (["ingest", "--config", "nope"], "ingest_img2dataset"),  # nothing close: every ingest config
        (["pretrain", "--config", "pretrain_tinyy"], "pretrain_tiny"),
        (["train", "--task", "vqa", "--config", "finetune_vqa_tini"], "finetune_vqa_tiny"),
        (["finetune", "--task", "caption", "--config", "finetune_captoin_tiny"], "finetune_caption_tiny"),
        (["tune", "--task", "vqa", "--space", "tune_vqaa", "--storage", "s", "--name", "n"], "tune_vqa"),
        (
            [
                "tune",
                "--task",
                "vqa",
                "--space",
                "tune_vqa",
                "--config",
                "finetune_vqa_tin",
                "--storage",
                "s",
                "--name",
                "n",
            ],
            "finetune_vqa_tiny",
        ),  # fmt: skip
    ],
)
def test_a_wrong_config_name_says_it_does_not_exist_and_names_the_closest(argv, closest, capsys, no_ray):
    line = refused(argv, capsys)
    assert "does not exist" in line and closest in line and "YAML" not in line


@pytest.mark.parametrize(
    "argv, says",
    [
        (["train", "--task", "vqa", "--config", "pretrain_tiny"],
         "is for task 'pretrain' (a config without `task:` is a pretraining config), not 'vqa'"),
        (["finetune", "--task", "caption", "--config", "finetune_vqa_tiny", "--init", "x"],
         "is for task 'vqa', not 'caption'"),
        (["pretrain", "--config", "finetune_snli_ve_tiny"], "is for task 'snli_ve', not 'pretrain'"),
        (["tune", "--task", "caption", "--space", "tune_vqa", "--config", "finetune_caption_tiny",
          "--storage", "s", "--name", "n"], "--space 'tune_vqa' is for task 'vqa', not 'caption'"),
        (["tune", "--task", "vqa", "--space", "tune_tiny", "--config", "finetune_caption_tiny",
          "--storage", "s", "--name", "n"], "--config 'finetune_caption_tiny' is for task 'caption', not 'vqa'"),
        (["tune", "--task", "vqa", "--space", "finetune_vqa_tiny", "--storage", "s", "--name", "n"],
         "is a training config, for `mplug pretrain/finetune/train/tune --config`, not a search space"),
        (["pretrain", "--config", "tune_tiny"], "is a search space, for `mplug tune --space`"),
        (["ingest", "--config", "pretrain_tiny"], "is a training config"),
        (["pretrain", "--config", "ingest_vqa"], "is an ingest config, for `mplug ingest --config`"),
        (["finetune", "--task", "vqa", "--config", "finetune_vqa_tiny", "--set", "caption.max_length=20"],
         "--set caption.max_length: a caption option (read by caption, video_caption), and this is task 'vqa'"),
    ],
)  # fmt: skip
def test_a_config_of_another_task_or_kind_is_refused(argv, says, capsys, no_ray):
    line = refused(argv, capsys)
    assert says in line
    if "for task" in line:  # and the shipped configs of the command's task are named
        task = argv[argv.index("--task") + 1] if "--task" in argv else "pretrain"
        assert f"shipped for {task}: " in line and task in line.split("shipped for", 1)[1]


def test_a_user_yaml_names_its_task(tmp_path, capsys, ingest_output):
    own = tmp_path / "mine.yaml"
    own.write_text("model: {preset: tiny}\nrun: {max_steps: 2}\n")  # no `task:`: a pretraining config
    assert "is for task 'pretrain'" in refused(["finetune", "--task", "vqa", "--config", str(own)], capsys)
    own.write_text("task: vqa\nmodel: {preset: tiny}\nrun: {max_steps: 2}\n")
    line = refused(["finetune", "--task", "vqa", "--config", str(own), "--data", ingest_output], capsys)
    assert "needs weights to start from" in line  # past the task check
    line = refused(["finetune", "--task", "vqa", "--config", str(own), "--set", "task=caption"], capsys)
    assert "--set task=caption contradicts" in line


def test_shipped_placeholders_are_refused_in_the_plan_with_the_flag_to_pass(capsys, ingest_output, tmp_path):
    line = refused(["finetune", "--task", "vqa", "--config", "finetune_vqa_base", "--data", ingest_output,
                    "--dry-run"], capsys)  # fmt: skip
    assert line.startswith(
        "mplug finetune: model.init is a placeholder (s3://CHANGE-ME/mplug-runs/pretrain-base/final): "
        "pass --init STORAGE/RUN or an official checkpoint"
    )
    assert "run.storage is a placeholder (s3://CHANGE-ME/mplug-runs): pass --storage URI" in line
    line = refused(["pretrain", "--config", "pretrain_base", "--data", ingest_output, "--dry-run"], capsys)
    assert (
        line == "mplug pretrain: run.storage is a placeholder (s3://CHANGE-ME/mplug-runs): pass --storage URI"
    )
    code = main(["pretrain", "--config", "pretrain_base", "--data", ingest_output, "--storage", str(tmp_path),
                 "--dry-run"])  # fmt: skip
    assert code == 0 and "preset base" in capsys.readouterr().out


def test_check_placeholders_names_every_key_in_one_line():
    check_placeholders({"model": {"init": "runs/x/final"}, "data": {"uris": ["a", "b"]}})  # none: passes
    with pytest.raises(ConfigError) as err:
        check_placeholders(
            {"data": {"uris": ["s3://b/ok", "s3://CHANGE-ME/raw"]}, "vqa": {"answer_list": "CHANGE-ME"}}
        )
    assert str(err.value) == (
        "data.uris is a placeholder (s3://CHANGE-ME/raw): pass --data URI; "
        "vqa.answer_list is a placeholder (CHANGE-ME): pass --set vqa.answer_list=VALUE"
    )
    with pytest.raises(ConfigError, match=r"^input is a placeholder \(s3://CHANGE-ME/x\): pass --input URI$"):
        check_placeholders({"input": "s3://CHANGE-ME/x"}, {"input": "--input URI"})


def test_the_task_sections_each_task_reads_are_those_its_code_reads():
    """`check_task_keys` refuses options of sections a task does not read: pinned against the
    `self.job.<section>` the task classes (and their bases) use."""
    import inspect
    import re

    from jobs.cli import SECTIONS_READ, TASK_SECTIONS
    from pipelines.tasks import TASKS, task_class

    pattern = re.compile(rf"job\.({'|'.join(TASK_SECTIONS)})\b")
    for name in TASKS:
        cls = task_class(name)
        source = "".join(
            inspect.getsource(k) for k in cls.__mro__ if k.__module__.startswith("pipelines.tasks")
        )
        assert set(pattern.findall(source)) == set(SECTIONS_READ.get(name, ())), name


def test_a_search_space_of_another_tasks_options_is_refused(tmp_path, capsys, no_ray):
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  vqa.num_beams: {choice: [3, 5]}\n")
    line = refused(["tune", "--task", "caption", "--space", str(space), "--config", "finetune_caption_tiny",
                    "--storage", "s", "--name", "n"], capsys)  # fmt: skip
    assert f"--space {str(space)!r}: vqa.num_beams: a vqa option (read by vqa, video_qa)" in line


# ---- ingest's checks come before Ray -----------------------------------------------------------------
def test_ingest_checks_what_needs_no_cluster_before_ray(tmp_path, capsys, no_ray):
    annotations = tmp_path / "ann.json"
    annotations.write_text("[]")
    out = str(tmp_path / "out")
    line = refused(["ingest", "--format", "json", "--input", str(annotations), "--output", out], capsys)
    assert "--format json needs --image-root" in line
    line = refused(
        ["ingest", "--format", "parquet", "--input", str(tmp_path / "absent"), "--output", out], capsys
    )
    assert line.endswith(f"--input {str(tmp_path / 'absent')!r} does not exist")
    line = refused(["ingest", "--format", "parquet", "--input", str(annotations), "--output", out,
                    "--image-root", str(tmp_path)], capsys)  # fmt: skip
    assert "--image-root applies to --format json only" in line
    line = refused(["ingest", "--input", str(annotations), "--output", out], capsys)
    assert "invalid config: format: Field required" in line
    config = tmp_path / "ingest.yaml"
    config.write_text(
        "format: json\ninput: s3://CHANGE-ME/annotations.json\nimage_root: s3://CHANGE-ME/images\n"
    )
    line = refused(["ingest", "--config", str(config), "--output", out], capsys)
    assert line == (
        "mplug ingest: input is a placeholder (s3://CHANGE-ME/annotations.json): pass --input URI; "
        "image_root is a placeholder (s3://CHANGE-ME/images): pass --image-root URI"
    )


def test_evaluate_checks_its_inputs_before_ray(tmp_path, capsys, no_ray, ingest_output):
    model = tmp_path / "final"
    model.mkdir()
    line = refused(["evaluate", "--task", "vqa", "--model", str(model), "--data", ingest_output, "--output",
                    str(tmp_path / "o")], capsys)  # fmt: skip
    assert "is not a model folder (no config.json)" in line
    (model / "config.json").write_text("{}")
    line = refused(["evaluate", "--task", "vqa", "--model", str(model), "--data", str(tmp_path), "--output",
                    str(tmp_path / "o")], capsys)  # fmt: skip
    assert "has no stats.json: pass an output folder of `mplug ingest`" in line
    line = refused(["evaluate", "--task", "vqa", "--model", str(model), "--data", ingest_output, "--output",
                    str(tmp_path / "o"), "--set", "grounding.iou_threshold=0.7"], capsys)  # fmt: skip
    assert "a grounding option (read by grounding), and this is task 'vqa'" in line


# ---- errors: one line, exit 2 for config errors, 1 for the rest ---------------------------------------
def test_an_error_that_is_not_the_config_exits_1_in_one_line(capsys, tmp_path):
    code = main(["pretrain", "--config", "pretrain_tiny", "--data", "nosuch://bucket/x", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "(--debug shows the traceback)" in err


def test_error_line_is_one_line():
    multi = ConfigError("invalid config x.yaml:\n  optim.lr: must be > 0 (got -1)\n  run.name: bad")
    assert error_line(multi) == "invalid config x.yaml: optim.lr: must be > 0 (got -1); run.name: bad"
    remote = RuntimeError('Traceback (most recent call last):\n  File "x.py", line 1\nValueError: no rows')
    assert error_line(remote) == "ValueError: no rows"
    assert error_line(ValueError("first\nsecond")) == "first"


# ---- the demo's output --------------------------------------------------------------------------------
def test_demo_output_to_a_file_has_no_terminal_control_sequences(monkeypatch):
    import io
    import logging
    import os
    import sys

    from jobs.demo import _PlainText, quiet_output

    stream = io.StringIO()
    plain = _PlainText(stream)
    assert (
        plain.write("\x1b[36m(RayTrainWorker pid=7)\x1b[0m step 10\r\x1b[A\x1b[2Kbar 50%\r\n") == 56
    )  # all of it taken
    assert stream.getvalue() == "(RayTrainWorker pid=7) step 10\nbar 50%\r\n" and not plain.isatty()
    for name in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    handler = logging.StreamHandler(sys.stderr)  # as Ray's logger holds the stream it started with
    logger = logging.getLogger("test_cli.ray_like")
    logger.addHandler(handler)
    try:
        quiet_output(plain=True)  # output to a file: Ray's workers inherit these when it starts
        assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and os.environ["RAY_COLOR_PREFIX"] == "0"
        assert isinstance(sys.stdout, _PlainText) and isinstance(sys.stderr, _PlainText)
        logger.warning("View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265\x1b[39m\x1b[22m")
        assert sys.stderr._stream.getvalue() == "View the dashboard at http://127.0.0.1:8265\n"
    finally:
        logger.removeHandler(handler)


# ---- env and the packaged tokenizer ---------------------------------------------------------------------
def test_env_reports_versions_and_tokenizer(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "ray", "transformers", "timm", "tokenizer"):
        assert name in out
    assert "MISSING" not in out


def test_packaged_tokenizer_is_bert_uncased():
    from mplug.tokenizer import load_tokenizer

    tok = load_tokenizer()
    assert tok.vocab_size == 30522
    assert tok.tokenize("A Red CIRCLE") == ["a", "red", "circle"]
    assert tok.cls_token_id == 101 and tok.sep_token_id == 102
