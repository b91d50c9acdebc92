"""What `mplug submit` decides before it talks to a cluster: the command (real parser), the
address, the token (Ray's own loader), what ships and what must never ship."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from jobs.cli import main
from jobs.submission import (
    CHECKOUT_EXCLUDES,
    Credentials,
    SubmissionError,
    check_job_config,
    check_job_id,
    check_no_token_in,
    checkout_root,
    entrypoint,
    find_token,
    job_env_vars,
    parse_mplug_command,
    project_runtime_env,
    resolve_address,
)
from tests.gloo import free_port

pytestmark = pytest.mark.unit

TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_HEADERS", "RAY_AUTH_MODE")


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: no variables, and a home without ~/.ray/auth_token."""
    for name in TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# ---- the command ---------------------------------------------------------------------------------------
def test_a_valid_command_parses_with_the_real_parser():
    args = parse_mplug_command(["pretrain", "--config", "pretrain_tiny", "--max-steps", "4"])
    assert (args.command, args.config, args.max_steps) == ("pretrain", "pretrain_tiny", 4)


@pytest.mark.parametrize(
    "words, says",
    [
        (["pretrian"], "invalid choice: 'pretrian'"),
        (["pretrain", "--max-steps", "four"], "argument --max-steps: invalid int value: 'four'"),
        (["pretrain", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["pretrain", "--config", "pretrain_huge"], "--config 'pretrain_huge' does not exist"),
        (["finetune", "--task", "vqa", "--config", "pretrain_tiny"], "is for task 'pretrain'"),
        (
            ["tune", "--task", "vqa", "--space", "tune_caption"],
            "--space 'tune_caption' is for task 'caption'",
        ),
        (["submit", "--", "env"], "`mplug submit` runs here, not on the cluster"),
        ([], "no command after `--`"),
    ],
)
def test_an_invalid_command_is_one_clear_error(words, says):
    with pytest.raises(SubmissionError) as err:
        parse_mplug_command(words)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    "words, says",
    [
        (
            ["finetune", "--task", "vqa", "--config", "finetune_vqa_base", "--data", "s3://b/p"],
            "model.init is a placeholder (s3://CHANGE-ME/mplug-runs/pretrain-base/final): pass --init",
        ),
        (["pretrain", "--config", "pretrain_base", "--data", "s3://b/p"], "run.storage is a placeholder"),
        (["finetune", "--task", "vqa", "--config", "finetune_vqa_tiny"], "needs weights to start from"),
        (
            ["pretrain", "--config", "pretrain_tiny", "--set", "vqa.num_beams=3"],
            "--set vqa.num_beams: a vqa option",
        ),
        (["ingest", "--config", "ingest_coco_json"], "invalid config: input: Field required"),
    ],
)
def test_a_job_whose_config_its_command_refuses_is_not_submitted(words, says):
    """The merged config, as the command checks it before Ray starts: refused here, not submitted
    to fail on the cluster."""
    with pytest.raises(SubmissionError) as err:
        check_job_config(parse_mplug_command(words))
    assert says in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_a_job_whose_placeholders_its_flags_replace_is_checked_and_a_uri_config_left_to_the_cluster():
    check_job_config(parse_mplug_command(
        ["finetune", "--task", "vqa", "--config", "finetune_vqa_base", "--init", "s3://b/final",
         "--data", "s3://b/p", "--storage", "s3://b/runs"]))  # fmt: skip
    check_job_config(parse_mplug_command(["pretrain", "--config", "s3://b/mine.yaml"]))
    check_job_config(parse_mplug_command(["env"]))


def test_cli_refuses_an_invalid_command_before_contacting_any_cluster(capsys, no_token):
    # An address where nothing listens: the refusal must be about the command, not the cluster.
    code = main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "pretrain", "--bogus"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err
        == "mplug submit: not a valid mplug command: `mplug pretrain --bogus`: unrecognized arguments: --bogus"
    )
    # A shipped placeholder, as a newcomer first meets it: the flag to pass, not a cluster's error.
    code = main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "finetune", "--task", "vqa",
                 "--config", "finetune_vqa_base", "--data", "s3://b/p", "--storage", "s3://b/runs"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(
        "mplug submit: model.init is a placeholder (s3://CHANGE-ME/mplug-runs/pretrain-base/final)"
    )


def test_cli_names_an_address_where_no_cluster_answers(no_token):
    # In its own process, as a user runs it: a process that has started Ray (the shared test
    # instance, token auth on) keeps Ray's auth state, which would change the client's answer.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    address = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "submit", "--address", address, "--", "env"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1, done.stderr
    assert err[0].startswith(f"mplug submit: no Ray cluster answers at {address}")


def test_entrypoint_runs_the_module_with_the_words_quoted():
    assert (
        entrypoint(["pretrain", "--set", "run.name=a b"])
        == "python -m jobs.cli pretrain --set 'run.name=a b'"
    )
    assert entrypoint(["env"], python="/opt/venv/bin/python") == "/opt/venv/bin/python -m jobs.cli env"


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 65])
def test_job_names_ray_cannot_keep_are_refused(name):
    with pytest.raises(SubmissionError, match="--name"):
        check_job_id(name)


# ---- the address ---------------------------------------------------------------------------------------
def test_address_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-ray-address:8265")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://from-api-server:8265")
    assert resolve_address("http://flag:8265") == ("http://flag:8265", "--address")
    assert resolve_address(None) == ("http://from-api-server:8265", "$RAY_API_SERVER_ADDRESS")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert resolve_address(None) == ("http://from-ray-address:8265", "$RAY_ADDRESS")
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(None) == (None, "auto")


# ---- the token ------------------------------------------------------------------------------------------
def test_token_is_found_where_ray_looks_and_sent_as_bearer(monkeypatch, no_token):
    home_token = no_token / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("from-home-file")
    creds = find_token()
    assert creds.headers == {"authorization": "Bearer from-home-file"} and creds.source == "~/.ray/auth_token"

    path_token = no_token / "token"
    path_token.write_text("from-path-file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    creds = find_token()
    assert creds.token == "from-path-file" and creds.source == f"$RAY_AUTH_TOKEN_PATH ({path_token})"

    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    creds = find_token()
    assert creds.token == "from-env" and creds.source == "$RAY_AUTH_TOKEN"
    assert "from-env" not in repr(creds)


def test_no_token_means_no_header(no_token):
    creds = find_token()
    assert creds.headers == {} and creds.source is None and creds.token is None


def test_an_unreadable_token_file_is_named_not_shown(monkeypatch, no_token):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_token / "missing"))
    with pytest.raises(SubmissionError, match="RAY_AUTH_TOKEN_PATH=.*missing.*cannot be read"):
        find_token()


def test_an_authorization_header_of_ray_job_headers_is_kept(monkeypatch, no_token):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("RAY_JOB_HEADERS", '{"Authorization": "Bearer via-proxy", "X-Team": "vision"}')
    creds = find_token()
    assert creds.headers == {"Authorization": "Bearer via-proxy", "X-Team": "vision"}
    monkeypatch.setenv("RAY_JOB_HEADERS", "not json")
    with pytest.raises(SubmissionError, match="RAY_JOB_HEADERS is not a JSON object"):
        find_token()


def test_the_token_never_ships_with_a_job(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t")
    monkeypatch.setenv("MY_COPY", "s3cr3t")
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        with pytest.raises(SubmissionError, match="never shipped"):
            job_env_vars([name])
    creds = Credentials(headers={"authorization": "Bearer s3cr3t"}, source="$RAY_AUTH_TOKEN")
    with pytest.raises(SubmissionError, match="env_vars contains the cluster's auth token"):
        check_no_token_in(
            creds, command="python -m jobs.cli env", env_vars={"env_vars": job_env_vars(["MY_COPY"])}
        )
    check_no_token_in(creds, command="python -m jobs.cli env", metadata={"mplug_command": "env"})


def test_env_names_a_variable_that_is_not_set(monkeypatch):
    monkeypatch.delenv("MPLUG_TEST_UNSET", raising=False)
    with pytest.raises(SubmissionError, match="--env MPLUG_TEST_UNSET: not set in this environment"):
        job_env_vars(["MPLUG_TEST_UNSET"])


# ---- what ships --------------------------------------------------------------------------------------------
def test_a_checkout_ships_as_working_dir_and_an_install_as_a_pinned_requirement():
    root = checkout_root()
    assert root is not None and (root / "jobs" / "submission.py").is_file()
    auto = project_runtime_env("auto", {"AWS_REGION": "eu-west-1"})
    assert auto.mode == "checkout" and auto.runtime_env["working_dir"] == str(root)
    assert auto.runtime_env["env_vars"] == {"AWS_REGION": "eu-west-1"}
    from importlib.metadata import version

    pip = project_runtime_env("pip", {})
    assert pip.runtime_env == {"pip": [f"mplug-ray=={version('mplug-ray')}"]}
    assert project_runtime_env("installed", {}).runtime_env == {}


def test_the_checkout_upload_holds_the_sources_and_nothing_ignored(tmp_path):
    """Ray's own packager, with .gitignore and our excludes: the code goes, the venv does not."""
    from ray._private.runtime_env.packaging import create_package

    root = checkout_root()
    package = tmp_path / "pkg.zip"
    create_package(str(root), package, include_gitignore=True, excludes=list(CHECKOUT_EXCLUDES))
    names = zipfile.ZipFile(package).namelist()
    assert {
        "jobs/cli.py",
        "jobs/submission.py",
        "pipelines/storage.py",
        "jobs/configs/pretrain_tiny.yaml",
    } <= set(names)
    assert not [n for n in names if n.startswith((".venv/", ".git/", "demo_out/")) or "__pycache__" in n]
    assert package.stat().st_size < 32 * 2**20
