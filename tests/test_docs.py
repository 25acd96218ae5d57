"""What the README, docs/ and the examples' docstrings tell a newcomer must be true.

- Every dotted API name they mention (``commpress.x.y``, ``cdist.f``) resolves.
- Every command they show (fenced shell blocks, inline code that starts with
  ``commpress``/``python``/``torchrun``/``bash``, the examples' usage lines) names
  files and modules that exist, and its options are options of that program:
  ``commpress ...`` through commpress's own parser, repository scripts through
  their ``--help``. The examples themselves run in ``tests/test_examples.py``.

A placeholder such as ``train.py`` (the user's script) or ``...`` is not checked.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
_PROGRAMS = r"(?:\w+=\S+ )*(?:commpress|python3?|torchrun|bash) "


def _docstring(path: Path) -> str:
    text = path.read_text()
    return text.split('"""')[1] if text.count('"""') >= 2 else ""


def _api_names() -> dict[str, str]:
    """Dotted names -> the first file that mentions them."""
    names: dict[str, str] = {}
    for path in [*DOCS, *EXAMPLES]:
        for m in re.finditer(
            r"(?<![\w/.-])(commpress(?:\.[A-Za-z_]\w*)+|cdist\.[A-Za-z_]\w*)", path.read_text()
        ):
            names.setdefault(m.group(1).rstrip("."), path.name)
    return names


def _resolve(name: str) -> object:
    parts = name.split(".")
    if parts[0] == "cdist":
        parts = ["commpress", "distributed", *parts[1:]]
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _shell_blocks(text: str) -> list[str]:
    """The bodies of fenced blocks marked bash/sh/shell/console or unmarked."""
    blocks, body, lang = [], None, ""
    for line in text.splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence and body is None:
            body, lang = [], fence.group(1)
        elif fence:
            if lang in ("", "bash", "sh", "shell", "console"):
                blocks.append("\n".join(body).replace("\\\n", " "))
            body = None
        elif body is not None:
            body.append(line)
    return blocks


def _commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every command shown."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in _shell_blocks(text):
            found += [(path.name, line.strip()) for line in block.splitlines()]
        inline = re.sub(r"```.*?```", "", text, flags=re.S)
        found += [(path.name, m.group(1).strip()) for m in re.finditer(r"`([^`\n]+)`", inline)]
    for path in EXAMPLES:
        found += [(path.name, line.strip()) for line in _docstring(path).splitlines()]
    commands = []
    for where, line in found:
        for part in re.split(r"&&|\|", line.split(" #")[0]):
            part = part.strip()
            if re.match(_PROGRAMS, part + " ") and "..." not in part:
                commands.append((where, part))
    return sorted(set(commands))


def test_the_scan_finds_what_it_should():
    """Guards the scanners themselves: they must see the README's quick start and API."""
    commands = [c for _, c in _commands()]
    assert "commpress bench" in commands and "bash scripts/test.sh" in commands
    assert "python examples/wrap_allreduce.py" in commands
    names = _api_names()
    assert "commpress.patch" in names and "cdist.all_reduce" in names
    assert len(names) > 30 and len(commands) > 15


@pytest.mark.parametrize("name", sorted(_api_names()))
def test_documented_api_name_exists(name):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{name} (in {_api_names()[name]}) does not resolve: {exc!r}")


@cache
def _help(argv: tuple[str, ...]) -> str:
    proc = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _check_script(argv: list[str], where: str) -> None:
    """``python SCRIPT ARGS`` or ``python -m MODULE ARGS``: it exists; its options are its own."""
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        if module == "commpress":
            _check_commpress(args, where)
            return
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        target: tuple[str, ...] = ("-m", module)
    else:
        script, args = argv[0], argv[1:]
        if "/" not in script:
            return  # the user's own script (train.py)
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        if not script.endswith(".py"):
            return
        target = (script,)
    if "--" in args:  # what follows belongs to the program it launches
        args = args[: args.index("--")]
    options = [a.split("=")[0] for a in args if a.startswith("--")]
    if options:
        shown = _help(target)
        for option in options:
            assert option in shown, f"{where}: {' '.join(target)} has no option {option}"


def _check_commpress(args: list[str], where: str) -> None:
    from commpress.cli import build_parser

    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: `commpress {' '.join(args)}` does not parse (exit {exc.code})")
    script = getattr(parsed, "script", None)
    if script and "/" in script:
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"


def _subcommands() -> set[str]:
    import argparse

    from commpress.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


@pytest.mark.parametrize("where, command", _commands())
def test_documented_command_is_valid(where, command):
    argv = shlex.split(command)
    while argv and re.match(r"^\w+=", argv[0]):
        argv.pop(0)  # environment assignments
    program, args = argv[0], argv[1:]
    if program == "commpress":
        if len(args) == 1:  # a subcommand named in prose: `commpress run`
            assert args[0] in _subcommands(), f"{where}: no subcommand commpress {args[0]}"
        elif args:
            _check_commpress(args, where)
    elif program in ("python", "python3"):
        if args and args[0] != "-c" and args[:2] != ["-m", "venv"]:
            _check_script(args, where)
    elif program == "torchrun":
        no_python = "--no-python" in args
        while args and args[0].startswith("-"):  # torchrun's own options and their values
            option = args.pop(0)
            if (
                "=" not in option
                and args
                and not args[0].startswith("-")
                and option
                not in (
                    "--no-python",
                    "--standalone",
                )
            ):
                args.pop(0)
        if no_python and args[:1] == ["commpress"]:
            _check_commpress(args[1:], where)
        elif args:
            _check_script(args, where)
    elif program == "bash":
        assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
