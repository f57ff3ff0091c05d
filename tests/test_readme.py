"""Every command the README and docs/ show parses with the script it names: no flag that does not exist."""
import re
import shlex
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

SCRIPTS = ["dcgan", "wgan", "cgan", "srgan", "vae", "evaluate", "interpolate"]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shown_commands():
    """(document, command tokens) for each `python <script>.py ...` line in a fenced code block."""
    commands = []
    for path in DOCUMENTS:
        in_code = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|;|\bdo\b|\bdone\b", line):
                try:
                    tokens = shlex.split(part.strip())
                except ValueError:  # not a shell command (a quote in prose)
                    continue
                if len(tokens) >= 2 and tokens[0] == "python" and tokens[1][:-3] in SCRIPTS and tokens[1].endswith(".py"):
                    commands.append((path.name, tokens[1][:-3], [t.replace("$d", "1") for t in tokens[2:]]))
    return commands


COMMANDS = shown_commands()


def test_the_readme_shows_a_command_for_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("document,script,argv", COMMANDS, ids=[f"{d}:{s}:{' '.join(a)[:60]}" for d, s, a in COMMANDS])
def test_shown_command_parses(document, script, argv):
    module = __import__(script)
    try:
        module.get_args(argv)
    except SystemExit as e:
        pytest.fail(f"{document}: python {script}.py {' '.join(argv)} does not parse (exit {e.code})")
