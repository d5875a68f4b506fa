"""The pages a person navigates: README.md, BENCHMARKS.md and docs/*.md.

A page fails when a relative link points at a file or heading that is gone, when a `flagrelease <command>` in its
code names a command (or a choice, or an option) that the CLI's parser no longer has, or when it names a
`scripts/<name>.sh` or a `python -m` module of this repository that does not exist. Each problem names the page and
the line. The commands come from `flows.cli._parser()`, never from a list kept here.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest

from flows.cli import _parser
from tests.conftest import PROJECT_DIR

PAGES = [PROJECT_DIR / "README.md", PROJECT_DIR / "BENCHMARKS.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...: not checked here
COMMAND = re.compile(r"(?<![\w./-])(?:\.venv/bin/)?flagrelease[ \t]+([A-Za-z][\w-]*)([^\n]*)")
COMMAND_END = re.compile(r" {2,}|\s#|&&|;|\s\|\s|\s>\s")  # two spaces start a description in a command table
SCRIPT = re.compile(r"(?<![\w.-])scripts/([\w.-]+\.sh)\b")
MODULE = re.compile(r"\bpython3? -m ([A-Za-z_][\w.]*)")


@dataclass(frozen=True)
class Text:
    text: str
    line: int  # the line of the text's first character

    def line_of(self, offset: int) -> int:
        return self.line + self.text.count("\n", 0, offset)


@dataclass
class Page:
    """A markdown page split into prose (paragraphs, code spans blanked) and code (fenced lines and code spans)."""

    path: Path
    prose: list[Text] = field(default_factory=list)
    code: list[Text] = field(default_factory=list)
    headings: list[str] = field(default_factory=list)


def read_page(path: Path) -> Page:
    page = Page(path)
    paragraph: list[str] = []
    start = 0
    fence = None

    def end_paragraph() -> None:
        if paragraph:
            add_paragraph(page, Text("\n".join(paragraph), start))
            paragraph.clear()

    for number, line in enumerate(path.read_text().splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                fence = None
            else:
                page.code.append(Text(line, number))
        elif opening:
            end_paragraph()
            fence = opening.group(1)
        elif not line.strip():
            end_paragraph()
        else:
            if not paragraph:
                start = number
            paragraph.append(line)
            heading = HEADING.match(line)
            if heading:
                page.headings.append(heading.group(1))
    end_paragraph()
    return page


def add_paragraph(page: Page, paragraph: Text) -> None:
    prose = paragraph.text
    for span in CODE_SPAN.finditer(paragraph.text):
        page.code.append(Text(span.group(2), paragraph.line_of(span.start(2))))
        blank = re.sub(r"[^\n]", " ", span.group(0))
        prose = prose[:span.start()] + blank + prose[span.end():]
    page.prose.append(Text(prose, paragraph.line))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in read_page(path).headings:
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def where(page: Page, root: Path, line: int) -> str:
    return f"{page.path.relative_to(root)}:{line}"


def broken_links(page: Page, root: Path) -> list[str]:
    problems = []
    for text in page.prose:
        found = [(m.group(1), m.start()) for m in INLINE_LINK.finditer(text.text)]
        found += [(m.group(1), m.start()) for m in REFERENCE_LINK.finditer(text.text)]
        for target, offset in found:
            problem = link_problem(page.path, target, root)
            if problem:
                problems.append(f"{where(page, root, text.line_of(offset))}: link ({target}): {problem}")
    return problems


def link_problem(source: Path, target: str, root: Path) -> str | None:
    if not target or SCHEME.match(target):
        return None
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / unquote(path_part)).resolve() if path_part else source.resolve()
    if not resolved.is_relative_to(root.resolve()):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file or folder"
    if anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
        return f"no heading with the anchor #{anchor} in {resolved.relative_to(root.resolve())}"
    return None


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def unknown_commands(page: Page, root: Path, commands: dict[str, argparse.ArgumentParser],
                     global_options: set[str]) -> list[str]:
    problems = []
    for text in page.code:
        for match in COMMAND.finditer(text.text):
            name, rest = match.group(1), COMMAND_END.split(match.group(2), maxsplit=1)[0]
            here = where(page, root, text.line_of(match.start()))
            if name not in commands:
                problems.append(f"{here}: `flagrelease {name}`: no such command; the CLI has {', '.join(sorted(commands))}")
                continue
            problems += [f"{here}: `flagrelease {name}`: {p}"
                         for p in argument_problems(commands[name], rest.split(), global_options)]
    return problems


def argument_problems(command: argparse.ArgumentParser, words: list[str], global_options: set[str]) -> list[str]:
    problems = []
    choices = [a.choices for a in command._actions if not a.option_strings and a.choices]
    if choices and words and words[0][0] not in "<[-$":
        problems += [f"{word!r} is not one of {', '.join(choices[0])}"
                     for word in words[0].split("|") if word not in choices[0]]
    allowed = options_of(command) | global_options
    for word in words:
        option = word.strip("[](),`").split("=")[0]
        if option.startswith("--") and option not in allowed:
            problems.append(f"no option {option}; it has {', '.join(sorted(options_of(command)))}")
    return problems


def missing_scripts(page: Page, root: Path) -> list[str]:
    problems = []
    for text in page.prose + page.code:
        for match in SCRIPT.finditer(text.text):
            if not (root / "scripts" / match.group(1)).is_file():
                problems.append(f"{where(page, root, text.line_of(match.start()))}: scripts/{match.group(1)}: no such script")
    return problems


def missing_modules(page: Page, root: Path) -> list[str]:
    """`python -m <module>` of this repository's packages must still exist (other modules are not ours to check)."""
    problems = []
    for text in page.code:
        for match in MODULE.finditer(text.text):
            parts = match.group(1).rstrip(".").split(".")
            if not (root / parts[0] / "__init__.py").is_file():
                continue
            module = root.joinpath(*parts)
            if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
                problems.append(f"{where(page, root, text.line_of(match.start()))}: python -m {match.group(1)}: "
                                "no such module here")
    return problems


def page_id(path: Path) -> str:
    return str(path.relative_to(PROJECT_DIR))


def test_the_docs_folder_has_pages():
    assert len(PAGES) > 2, "docs/*.md found no pages: the checks below would check nothing"


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_relative_links_point_at_files_and_headings_that_exist(path: Path):
    problems = broken_links(read_page(path), PROJECT_DIR)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_flagrelease_commands_in_code_are_commands_of_the_cli(path: Path):
    problems = unknown_commands(read_page(path), PROJECT_DIR, cli_commands(), options_of(_parser()))
    assert not problems, "commands the CLI does not have:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_named_scripts_and_modules_exist(path: Path):
    page = read_page(path)
    problems = missing_scripts(page, PROJECT_DIR) + missing_modules(page, PROJECT_DIR)
    assert not problems, "missing scripts or modules:\n" + "\n".join(problems)


def test_the_checks_report_what_is_broken_with_file_and_line(tmp_path: Path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text("")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("")
    (tmp_path / "flows" / "cli.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section, with `code`\n")
    page_path = tmp_path / "docs" / "page.md"
    page_path.write_text(
        "# Page\n"
        "\n"
        "Fine: [other](other.md), [section](other.md#a-section-with-code), [web](https://example.com),\n"
        "[self](#page), [setup](../scripts/setup.sh) and `[not a link](gone.md)` in code.\n"
        "Broken: [gone](gone.md) and [anchor](other.md#no-such-heading)\n"
        "and [outside](../../elsewhere.md).\n"
        "\n"
        "Run `flagrelease list`, `.venv/bin/flagrelease frobnicate`, `flagrelease services sideways`\n"
        "and `flagrelease plan x --offline --fast`.\n"
        "\n"
        "```bash\n"
        "bash scripts/setup.sh\n"
        "bash scripts/gone.sh\n"
        "python -m flows.cli\n"
        "python -m flows.gone\n"
        "python -m pytest\n"
        "flagrelease-five is a suite, flagrelease is a word in prose\n"
        "flagrelease deploy                       production: `prefect deploy --all`\n"
        "```\n")
    page = read_page(page_path)

    assert broken_links(page, tmp_path) == [
        "docs/page.md:5: link (gone.md): no such file or folder",
        "docs/page.md:5: link (other.md#no-such-heading): no heading with the anchor #no-such-heading in docs/other.md",
        "docs/page.md:6: link (../../elsewhere.md): points outside the repository",
    ]
    commands = unknown_commands(page, tmp_path, cli_commands(), options_of(_parser()))
    assert [p.split(": `")[0] for p in commands] == ["docs/page.md:8", "docs/page.md:8", "docs/page.md:9", "docs/page.md:17"]
    assert "`flagrelease frobnicate`: no such command" in commands[0]
    assert "'sideways' is not one of up, down, status" in commands[1]
    assert "no option --fast" in commands[2]
    assert "`flagrelease is`: no such command" in commands[3]  # a command line must name a command
    assert missing_scripts(page, tmp_path) == ["docs/page.md:13: scripts/gone.sh: no such script"]
    assert missing_modules(page, tmp_path) == ["docs/page.md:15: python -m flows.gone: no such module here"]
