"""Every `python convert.py ...` and `python -m finetune ...` command line in README.md's code blocks parses as
written: `convert.parse_args` / `finetune.cli.parse_args` accept it (flags parsed and validated; no file is read)."""

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(```|~~~)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
PREFIXES = (("python", "convert.py"), ("python", "-m", "finetune"))


def code_block_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced code block line; backslash continuations joined."""
    out, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def command_words(line: str) -> list[str] | None:
    """The words of a command line that runs convert.py or the finetune module (a `$ ` prompt, leading VAR=value
    assignments and a trailing # comment dropped); None for any other line."""
    try:
        words = shlex.split(line.strip().removeprefix("$ "), comments=True)
    except ValueError:
        return None
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if len(words) >= 3 and words[0] == "python" and words[1] == "-m" and words[2].startswith("finetune"):
        return words
    if len(words) >= 2 and words[0] == "python" and words[1] == "convert.py":
        return words
    return None


def readme_commands() -> list[tuple[str, list[str]]]:
    return [(f"README.md:{n}", words) for n, line in code_block_lines(README.read_text())
            if (words := command_words(line)) is not None]  # fmt: skip


COMMANDS = readme_commands()


def test_readme_has_commands_to_check():
    assert any(w[1] == "convert.py" for _, w in COMMANDS), "no `python convert.py` example found in README.md"


@pytest.mark.parametrize("where,words", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_readme_command_parses(where, words):
    if words[1] == "convert.py":
        import convert

        try:
            convert.parse_args(words[2:])  # a bad value raises UserError
        except SystemExit:  # argparse refused a flag (its one-line message is on stderr)
            pytest.fail(f"{where}: `{shlex.join(words)}` does not parse")
        return
    module = words[2]
    if module != "finetune":
        pytest.fail(f"{where}: `python -m {module}` is not the documented entry point `python -m finetune`")
    try:
        from finetune.cli import parse_args
    except ImportError as exc:
        pytest.skip(f"finetune.cli.parse_args does not exist yet: {exc}")
    parse_args(words[3:])


def test_extractor_handles_continuations_comments_and_assignments():
    text = "x\n```bash\nA=1 python convert.py m o \\\n  --layers -8--1   # last eight\npython x.py\n```\n"
    lines = code_block_lines(text)
    assert [command_words(line) for _, line in lines] == [
        ["python", "convert.py", "m", "o", "--layers", "-8--1"], None]
