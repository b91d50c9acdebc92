"""The README and docs/ cannot drift from the code: every `mplug` command in their shell blocks is
parsed by the real CLI parser (`jobs.cli.build_parser`), its shipped configs, `--set` keys and the
command after `mplug submit --` checked too, and a train/tune/ingest command's config goes through
the CLI's own merge and placeholder check; every `mplug …` in running text names a subcommand and
flags that exist; every `make` line names a Makefile target; Python blocks compile, search spaces
load, relative links resolve; the README keeps its two set-up commands and its preset table is
what the code computes. The checker is tested on documents that name what does not exist."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from jobs.cli import CONFIG_DIR, build_parser

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = ("bash", "sh", "shell", "console", "")
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")  # COMMAND, SUBCOMMAND in running text
# Which shipped configs each flag may name, by the command it is given to.
CONFIG_PREFIXES = {"ingest": ("ingest_",), "space": ("tune_",), "train": ("pretrain_", "finetune_")}
TRAIN_COMMANDS = ("train", "pretrain", "finetune", "tune")
SET_COMMANDS = (*TRAIN_COMMANDS, "evaluate", "infer")


@dataclass(frozen=True)
class Block:
    where: str  # "docs/data.md:42": the line after the opening fence
    lang: str
    body: str


@dataclass(frozen=True)
class Command:
    where: str
    words: tuple[str, ...]


def code_blocks(text: str, name: str) -> Iterator[Block]:
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), None)
        assert end is not None, f"{name}:{i + 1}: a code block that never closes"
        yield Block(f"{name}:{i + 2}", fence.group(1).lower(), "\n".join(lines[i + 1 : end]))
        i = end + 1


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.S | re.M)


def shell_commands(block: Block) -> Iterator[Command]:
    """Simple commands of a shell block: continuations joined, comments dropped, split at
    `&&`, `;`, `|`, `&`, leading `NAME=value` assignments removed."""
    name, first = block.where.rsplit(":", 1)
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for n, line in enumerate(block.body.splitlines()):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append((start, pending + line))
        pending = ""
    assert not pending, f"{block.where}: a block ends in a line continuation"
    for n, line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as err:
            raise AssertionError(f"{name}:{int(first) + n}: not a shell line ({err}): {line}") from None
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token in OPERATORS:
                while segment and ENV_ASSIGNMENT.match(segment[0]):
                    segment.pop(0)
                if segment:
                    yield Command(f"{name}:{int(first) + n}", tuple(segment))
                segment = []
            else:
                segment.append(token)


def mplug_words(words: tuple[str, ...]) -> list[str] | None:
    """The arguments of an `mplug` command (`mplug`, `.venv/bin/mplug`, `python -m jobs.cli`)."""
    if words[0] == "mplug" or words[0].endswith("/mplug"):
        return list(words[1:])
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ("-m", "jobs.cli"):
        return list(words[3:])
    return None


def _subparsers(parser) -> dict:
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return actions[0].choices if actions else {}


def parse_error(words: list[str]) -> str | None:
    """argparse's complaint about `mplug WORDS`, or None when the real parser accepts them."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(words)
        except SystemExit as stop:
            if stop.code not in (0, None):  # --help and --version exit 0
                lines = [line for line in err.getvalue().splitlines() if line.strip()]
                return lines[-1] if lines else f"exit status {stop.code}"
    return None


def _flag_values(words: list[str], flag: str) -> list[str]:
    values = []
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            values.append(words[i + 1])
        elif word.startswith(flag + "="):
            values.append(word.split("=", 1)[1])
    return values


def config_problems(words: list[str]) -> list[str]:
    """A shipped config name must exist, be of the command's kind, and be of its task."""
    command = words[0]
    problems = []
    task = "pretrain" if command == "pretrain" else next(iter(_flag_values(words, "--task")), None)
    for flag, kind in (("--config", "ingest" if command == "ingest" else "train"), ("--space", "space")):
        for value in _flag_values(words, flag):
            if "/" in value or "$" in value or value.endswith((".yaml", ".yml")):
                continue  # a file or URI of the user's
            shipped = CONFIG_DIR / f"{value}.yaml"
            if not shipped.is_file():
                problems.append(f"{flag} {value}: no shipped config of that name in {CONFIG_DIR.name}/")
                continue
            if not value.startswith(CONFIG_PREFIXES[kind]):
                problems.append(f"{flag} {value}: not {kind} config (names start {CONFIG_PREFIXES[kind]})")
            config_task = (yaml.safe_load(shipped.read_text()) or {}).get("task", "pretrain")
            if kind == "train" and task is not None and config_task != task:
                problems.append(f"{flag} {value} is a {config_task} config, the command's task is {task}")
    return problems


def set_problems(words: list[str]) -> list[str]:
    """`--set KEY=VALUE` names config keys that exist, with valid values, of the command's task
    (the CLI's own rule: another task's section is refused)."""
    from jobs.cli import check_task_keys
    from pipelines.train.config import ConfigError, load_config, parse_set_args

    pairs = _flag_values(words, "--set")
    if words[0] not in SET_COMMANDS or not pairs:
        return []
    task = "pretrain" if words[0] == "pretrain" else next(iter(_flag_values(words, "--task")), "pretrain")
    try:
        overrides = parse_set_args(pairs)
        check_task_keys(list(overrides), task)
        load_config(None, {"task": task, "run.max_steps": 1, **overrides})
    except (ConfigError, ValueError) as err:
        return [f"--set {' '.join(pairs)}: {str(err).splitlines()[0]}"]
    return []


def job_problems(words: list[str]) -> list[str]:
    """What the command's own pre-Ray checks refuse in its config: the YAML, `--set` and the flags
    merged and validated, and no shipped `CHANGE-ME` placeholder left (a YAML of the user's, named
    by path or URI, is theirs to check)."""
    from pipelines.train.config import ConfigError, check_placeholders

    command = words[0]
    if command not in (*TRAIN_COMMANDS, "ingest"):
        return []
    if any("/" in v or "$" in v for v in _flag_values(words, "--config")):
        return []
    args = build_parser().parse_args(words)
    try:
        if command == "ingest":
            from jobs.ingest_cmd import PLACEHOLDER_FLAGS, build_config

            check_placeholders(build_config(args).model_dump(mode="json"), PLACEHOLDER_FLAGS)
        else:
            from jobs.train_cmd import config_from_args

            check_placeholders(config_from_args(args).model_dump(mode="json"))
    except ConfigError as err:
        return [f"refused before Ray: {str(err).splitlines()[0]}"]
    return []


def command_problems(words: list[str]) -> list[str]:
    """Everything wrong with `mplug WORDS`; the command after `mplug submit … --` too."""
    error = parse_error(words)
    if error is not None:
        return [error]
    if not words or words[0].startswith("-"):
        return []
    # argparse accepts a flag's abbreviation (`--num-sample`): the docs name flags in full. (The
    # command after `submit --` is checked by the recursion below.)
    outer = words[: words.index("--")] if "--" in words else words
    problems = inline_problems(shlex.join(["mplug", *outer]))
    problems += config_problems(words) + set_problems(words)
    if not problems:
        problems = job_problems(words)
    if words[0] == "submit":
        if "--" not in words:
            return [*problems, "mplug submit without `--` before the command"]
        inner = words[words.index("--") + 1 :]
        problems += [f"after --: {p}" for p in command_problems(inner)]
    return problems


def inline_problems(span: str) -> list[str]:
    """`mplug …` in running text: the subcommand (and `jobs` action) exist, and every `--flag` is
    one of that subcommand's (values and placeholders are not checked)."""
    try:
        words = shlex.split(span)[1:]
    except ValueError:
        words = span.split()[1:]
    parser = build_parser()
    if not words or words[0].startswith("-"):
        flags = [w.split("=")[0] for w in words if w.startswith("--")]
        return [f"mplug has no option {f}" for f in flags if f not in parser._option_string_actions]
    commands = _subparsers(parser)
    if PLACEHOLDER.match(words[0]):  # `mplug COMMAND --help`
        return []
    if words[0] not in commands:
        return [f"no subcommand {words[0]!r} (valid: {sorted(commands)})"]
    sub, rest = commands[words[0]], words[1:]
    actions = _subparsers(sub)
    if actions and rest and not rest[0].startswith("-"):
        missing = [a for a in re.split(r"[|/]", rest[0]) if a and a not in actions]
        if missing:
            return [f"mplug {words[0]} has no action {missing} (valid: {sorted(actions)})"]
        if rest[0] in actions:
            sub, rest = actions[rest[0]], rest[1:]
    inner: list[str] = []
    if "--" in rest:
        rest, inner = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
    flags = [w.split("=")[0] for w in rest if w.startswith("--")]
    problems = [f"mplug {words[0]} has no option {f}" for f in flags if f not in sub._option_string_actions]
    return problems + (inline_problems(shlex.join(["mplug", *inner])) if inner else [])


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, flags=re.M)) - {".PHONY"}


def make_problems(words: tuple[str, ...]) -> list[str]:
    targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    missing = [t for t in targets if t not in makefile_targets()]
    return [f"no Makefile target {t!r}" for t in missing]


def doc_problems(text: str, name: str) -> list[str]:
    """Every problem of one markdown document, each as `FILE:LINE: …`."""
    problems: list[str] = []
    for block in code_blocks(text, name):
        if block.lang == "python":
            try:
                compile(block.body, block.where, "exec")
            except SyntaxError as err:
                problems.append(f"{block.where}: python block does not compile: {err}")
            continue
        if block.lang in ("yaml", "yml"):
            problems += [f"{block.where}: {p}" for p in yaml_problems(block.body)]
            continue
        if block.lang not in SHELL_LANGS:
            continue
        for command in shell_commands(block):
            words = mplug_words(command.words)
            if words is not None:
                problems += [
                    f"{command.where}: `mplug {shlex.join(words)}`: {p}" for p in command_problems(words)
                ]
            elif command.words[0] == "make":
                problems += [
                    f"{command.where}: `{shlex.join(command.words)}`: {p}"
                    for p in make_problems(command.words)
                ]
    outside = prose(text)
    for match in re.finditer(r"`((?:\.venv/bin/)?mplug(?: [^`]*)?)`", outside):
        line = outside[: match.start()].count("\n") + 1
        problems += [
            f"{name} (prose, near line {line}): `{match.group(1)}`: {p}"
            for p in inline_problems(match.group(1))
        ]
    return problems


def yaml_problems(body: str) -> list[str]:
    try:
        loaded = yaml.safe_load(body)
    except yaml.YAMLError as err:
        return [f"yaml block does not parse: {str(err).splitlines()[0]}"]
    if isinstance(loaded, dict) and "parameters" in loaded:  # a Tune search space: load it for real
        import tempfile

        from pipelines.tune.space import load_space

        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(body)
            f.flush()
            try:
                load_space(f.name)
            except Exception as err:  # noqa: BLE001 - any refusal is the finding, reported by name
                return [f"search space refused: {type(err).__name__}: {err}"]
    return []


# ---- the documents ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_in_the_docs_is_accepted_by_the_cli(path: Path) -> None:
    problems = doc_problems(path.read_text(), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_docs_hold_commands_to_check() -> None:
    """The extraction finds what the docs show (a parser that found nothing would pass anything)."""
    found = [
        words[0]
        for path in DOC_FILES
        for block in code_blocks(path.read_text(), path.name)
        if block.lang in SHELL_LANGS
        for command in shell_commands(block)
        if (words := mplug_words(command.words))
    ]
    for subcommand in (
        "synth",
        "ingest",
        "pretrain",
        "finetune",
        "train",
        "evaluate",
        "infer",
        "tune",
        "submit",
        "jobs",
    ):
        assert subcommand in found, f"no `mplug {subcommand}` in any shell block of README.md or docs/"


def test_readme_keeps_its_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Set-up") :]
    block = next(code_blocks(section, "README.md"))
    commands = [command.words for command in shell_commands(block)]
    assert commands == [("make", "demo"), ("make", "test")], commands


def test_readme_links_every_docs_page() -> None:
    text = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = prose(path.read_text())
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def link_problems(path: Path) -> list[str]:
    """Relative links name files that exist, and headings that exist in them."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path.read_text())):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such heading")
    return problems


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


def test_a_broken_link_fails(tmp_path) -> None:
    (tmp_path / "other.md").write_text("# Title\n\n## `mplug evaluate`, in short\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#mplug-evaluate-in-short) [b](other.md#nope) [c](gone.md)\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        problems = link_problems(doc)
    finally:
        ROOT = saved
    assert problems == [
        "doc.md: link to other.md#nope: no such heading",
        "doc.md: link to gone.md: no such file",
    ]


def test_readme_layout_names_every_package_and_pipelines_module() -> None:
    """The README's layout table stays the map DESIGN.md asks for: each top-level folder, and each
    module and subpackage of `pipelines/`, named in its row."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
    rows = dict(re.findall(r"^\| `([a-z]+)/` \| (.*) \|$", section[: section.index("\n## ", 1)], flags=re.M))
    for folder in ("mplug", "pipelines", "jobs", "tests", "benchmarks", "docs"):
        assert folder in rows, f"README.md's layout has no row for {folder}/"
    pipelines = [
        p.name + ("/" if p.is_dir() else "")
        for p in sorted((ROOT / "pipelines").iterdir())
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    ]
    missing = [name for name in pipelines if f"`{name}`" not in rows["pipelines"]]
    assert not missing, f"README.md's layout row for pipelines/ does not name {missing}"


def test_data_page_explains_every_reject_reason() -> None:
    """Ingest's fixed set of reasons, each a row of docs/data.md's table, and no other."""
    from pipelines.data.records import REJECT_REASONS

    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index("## Reject reasons") :]
    section = section[: section.index("\n## ", 1)]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    assert documented == set(REJECT_REASONS), (
        f"missing: {sorted(set(REJECT_REASONS) - documented)}; not a reason: {sorted(documented - set(REJECT_REASONS))}"
    )


def test_readme_preset_table_is_what_the_code_computes() -> None:
    from benchmarks.model_presets import markdown_table, preset_rows

    table = markdown_table(preset_rows())
    assert table in (ROOT / "README.md").read_text(), (
        "README.md's preset table differs from `python -m benchmarks.model_presets`:\n" + table
    )


# ---- the checker itself fails on what it must refuse --------------------------------------------
def _doc(*lines: str) -> str:
    return "\n".join(["Some text.", "", "```bash", *lines, "```", ""])


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["mplug ingest --input s3://b/raw --no-such-flag 3"], "unrecognized arguments: --no-such-flag"),
        (["mplug pretrain --config pretrain_tiny \\", "  --data s3://BUCKET/x --dataa s3://b/y"], "--dataa"),
        (["mplug evaluate --task vqaa --model m --data d --output o"], "invalid choice: 'vqaa'"),
        (
            ["mplug finetune --task vqa --config finetune_vqa_bse --data x"],
            "finetune_vqa_bse: no shipped config",
        ),
        (["mplug finetune --task vqa --config finetune_caption_base"], "is a caption config"),
        (["mplug ingest --config pretrain_tiny --input x"], "not ingest config"),
        (["mplug tune --task vqa --space finetune_vqa_base --config finetune_vqa_base"], "not space config"),
        (["mplug evaluate --task vqa --model m --data d --output o --set vqa.num_beam=3"], "num_beam"),
        (
            ["mplug evaluate --task vqa --model m --data d --output o --set caption.num_beams=3"],
            "a caption option",
        ),
        (
            [
                "mplug finetune --task vqa --config finetune_vqa_base --data s3://b/x --name n --storage s3://b/r"
            ],
            "init",
        ),
        (
            ["mplug pretrain --config pretrain_base --data s3://b/x --name n"],
            "refused before Ray: run.storage",
        ),
        (
            ["mplug ingest --input s3://b/x --format json --output s3://b/y --image-size 0"],
            "refused before Ray",
        ),
        (["B=s3://b && mplug submit --wait -- pretrain --confg pretrain_tiny"], "after --: "),
        (["mplug submit --wait pretrain --config pretrain_tiny"], "without `--`"),
        (["AWS_PROFILE=x .venv/bin/mplug jobs logz pt-tiny"], "invalid choice: 'logz'"),
        (["python -m jobs.cli env --adress x"], "--adress"),
        (["mplug tune --task vqa --space tune_vqa --num-sample 4"], "mplug tune has no option --num-sample"),
        (["make demo-fast"], "no Makefile target 'demo-fast'"),
    ],
)
def test_a_doc_naming_what_does_not_exist_fails(lines: list[str], expected: str) -> None:
    problems = doc_problems(_doc(*lines), "doc.md")
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("doc.md:4: ") for p in problems), problems  # names the file and line


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        ("mplug tune --max-concurent 4", "mplug tune has no option --max-concurent"),
        ("mplug evaluat", "no subcommand 'evaluat'"),
        ("mplug jobs status|lst", "has no action ['lst']"),
        ("mplug submit --wait -- ingest --formatt json", "mplug ingest has no option --formatt"),
        ("mplug submit --wiat -- env", "mplug submit has no option --wiat"),
    ],
)
def test_prose_naming_what_does_not_exist_fails(span: str, expected: str) -> None:
    problems = doc_problems(f"Run `{span}` now.\n", "doc.md")
    assert any(expected in p for p in problems), problems


def test_what_exists_passes() -> None:
    text = "\n".join(
        [
            "Use `mplug jobs status|list|logs|stop` or `mplug tune --max-concurrent N`.",
            _doc(
                "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265   # a comment",
                "mplug submit --wait --name x -- \\",
                "    pretrain --config pretrain_tiny --data $B/processed --storage s3://BUCKET/runs --name x",
                "RAY_AUTH_MODE=token ray start --head && mplug env --help",
                "mplug evaluate --task caption --model m --data d --output o --set caption.num_beams=3",
                "make CONSTRAINTS= demo",
            ),
            "```python",
            "print('quickstart')",
            "```",
        ]
    )
    assert doc_problems(text, "doc.md") == []
