from __future__ import annotations

import pytest

from jobs.cli import build_parser, main

pytestmark = pytest.mark.unit


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "env" in out and "demo" in out


def test_env_reports_versions_and_tokenizer(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "ray", "transformers", "timm", "tokenizer"):
        assert name in out
    assert "MISSING" not in out


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["nope"])
    assert exc.value.code == 2


def test_packaged_tokenizer_is_bert_uncased():
    from mplug.tokenizer import load_tokenizer

    tok = load_tokenizer()
    assert tok.vocab_size == 30522
    assert tok.tokenize("A Red CIRCLE") == ["a", "red", "circle"]
    assert tok.cls_token_id == 101 and tok.sep_token_id == 102
