"""The repository agrees with the app: completion scripts, docs, changelog, CI entry point, version.

`make completions` (pytest tests/test_repo_meta.py --update-golden) rewrites completions/* from the
app instead of comparing them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import adapterctl
from adapterctl.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
COMPLETIONS = ROOT / "completions"
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
CI_RUN = ROOT / ".ci" / "run"

#: shell -> file in completions/, as each shell expects it to be named.
COMPLETION_FILES = {"bash": "adapterctl.bash", "zsh": "_adapterctl", "fish": "adapterctl.fish"}
NO_DETECTION = "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, prog_name="adapterctl")
    return result.exit_code, result.stdout


def completion_script(shell: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The completion script Typer generates for `shell`, as `adapterctl --show-completion` prints."""
    monkeypatch.setenv(NO_DETECTION, "1")
    result = CliRunner().invoke(app, ["--show-completion", shell], prog_name="adapterctl")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes, f"empty {shell} completion script"
    return result.stdout_bytes


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("adapterctl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "adapterctl"]


def _non_empty_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _command(line: str) -> list[str]:
    """The words of a shell line, without its comment ([] for a line shlex cannot split)."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return []


# (a) completion scripts -------------------------------------------------------------------------


def test_completion_files_are_exactly_the_expected_ones(update_golden: bool) -> None:
    if update_golden:
        pytest.skip("rewriting completions/")
    assert sorted(p.name for p in COMPLETIONS.iterdir()) == sorted(COMPLETION_FILES.values())


@pytest.mark.parametrize("shell", sorted(COMPLETION_FILES))
def test_completion_script_is_up_to_date(
    shell: str, update_golden: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = COMPLETIONS / COMPLETION_FILES[shell]
    fresh = completion_script(shell, monkeypatch)
    if update_golden:
        COMPLETIONS.mkdir(exist_ok=True)
        path.write_bytes(fresh)
        return
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run `make completions`"
    assert path.read_bytes() == fresh, (
        f"{path.relative_to(ROOT)} is stale: run `make completions` and commit the result"
    )


@pytest.mark.parametrize("shell", sorted(COMPLETION_FILES))
def test_console_script_prints_the_same_completion_script(
    shell: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = completion_script(shell, monkeypatch)  # also sets the variable for the child
    proc = subprocess.run(
        [*_console_script(), "--show-completion", shell], capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == expected


# (b) every command has help, a README section and a CHANGELOG entry -----------------------------


def test_the_app_registers_commands() -> None:
    assert COMMANDS, "no commands registered on the Typer app"


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_help(name: str) -> None:
    code, out = _invoke([name, "--help"])
    assert code == 0, out
    assert out.strip()
    assert f"adapterctl {name}" in out


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_a_readme_section(name: str) -> None:
    headings = re.findall(r"^### (.+?)\s*$", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert name in headings, f"README.md has no `### {name}` section"


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_in_the_changelog(name: str) -> None:
    text = CHANGELOG.read_text(encoding="utf-8")
    assert re.search(rf"\badapterctl {re.escape(name)}\b", text), (
        f"CHANGELOG.md never mentions `adapterctl {name}`"
    )


# (c) changelog shape ----------------------------------------------------------------------------


def test_changelog_starts_with_a_title() -> None:
    first = _non_empty_lines(CHANGELOG)[0]
    assert re.fullmatch(r"# \S.*", first), f"CHANGELOG.md starts with {first!r}, not a `# ` title"


def test_changelog_has_unreleased_before_any_release() -> None:
    sections = [line for line in _non_empty_lines(CHANGELOG) if line.startswith("## ")]
    assert "## [Unreleased]" in sections, "CHANGELOG.md has no `## [Unreleased]` section"
    first_release = next(
        (i for i, s in enumerate(sections) if re.match(r"## \[\d", s)), len(sections)
    )
    assert sections.index("## [Unreleased]") < first_release, (
        "`## [Unreleased]` must come before the first release section"
    )


# (d) README's two commands and the CI entry point -----------------------------------------------


def test_readme_begins_with_its_title_then_make_demo_and_make_test() -> None:
    head = _non_empty_lines(README)[:5]
    assert len(head) == 5, head
    assert head[0] == "# adapterctl", f"README.md must start with its title, not {head[0]!r}"
    assert head[1].strip() == "```bash", (
        f"the title must be followed by a ```bash fence, not {head[1]!r}"
    )
    assert head[4].strip() == "```", (
        f"the opening code block must hold exactly two commands; line 5 is {head[4]!r}"
    )
    assert _command(head[2]) == ["make", "demo"], head[2]
    assert _command(head[3]) == ["make", "test"], head[3]


def test_ci_runs_make_test() -> None:
    lines = CI_RUN.read_text(encoding="utf-8").splitlines()
    assert any(_command(line)[:2] == ["make", "test"] for line in lines), (
        ".ci/run does not invoke `make test`"
    )


# (e) version ------------------------------------------------------------------------------------


def test_version_option_prints_package_version() -> None:
    code, out = _invoke(["--version"])
    assert code == 0, out
    assert out.split() == ["adapterctl", adapterctl.__version__]
