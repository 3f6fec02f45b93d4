"""The documentation holds together: relative links resolve, quoted `deit` commands parse, the README stays short.

Checked in README.md and every docs/*.md page:

* every relative Markdown link ``[text](path)`` points at a file or folder that exists (relative to the
  page), and every ``#anchor`` (bare, or on a link to another page) at a heading of the page it names;
* every ``deit <subcommand> ...`` quoted in a fenced code block or inline code names a subcommand that
  ``deit <subcommand> --help`` accepts, and uses only that subcommand's ``--flags``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from deit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
# where a `deit` command starts in a line of code: at its start (after an optional prompt), after
# `python -m` / `torchrun ... -m`, or after a shell separator
COMMAND_START = re.compile(r"(?:^\s*(?:\$\s+)?|\s-m\s+|[;&|(]\s*)(deit\s+[a-z].*)$")
EXTERNAL = ("http://", "https://", "mailto:")


# ---------------------------------------------------------------- reading Markdown


def split_fences(text: str) -> tuple[str, list[str]]:
    """(the text with fenced code blocks blanked out, line for line; the lines inside those blocks)."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def inline_code(prose: str) -> list[str]:
    """The contents of inline code spans (which may run over line breaks, not over blank lines)."""
    spans = []
    for paragraph in re.split(r"\n\s*\n", prose):
        spans += [" ".join(match.group(2).split()) for match in INLINE_CODE.finditer(paragraph)]
    return spans


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except hyphens and spaces, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of every heading outside code blocks; repeated headings get -1, -2 ... as on GitHub."""
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    result = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def link_problems(text: str, base: Path) -> list[str]:
    """Relative links of ``text`` (a page in folder ``base``) that do not resolve, each with the reason."""
    prose, _ = split_fences(text)
    prose = INLINE_CODE.sub("", prose)  # `[a](b)` in code is not a link
    problems = []
    for match in LINK.finditer(prose):
        target = match.group(1)
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in anchors(text):
                problems.append(f"{target}: no heading with that anchor in this page")
            continue
        resolved = (base / path).resolve()
        if not resolved.exists():
            problems.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with that anchor in {path}")
    return problems


def deit_commands(text: str) -> list[str]:
    """Every `deit <subcommand> ...` quoted in a code block (a line, with its continuations) or inline code."""
    prose, code = split_fences(text)
    lines, pending = [], ""
    for line in code:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    commands = []
    for line in lines + inline_code(prose):
        line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
        match = COMMAND_START.search(line)
        if match:
            commands.append(" ".join(match.group(1).split()))
    return commands


# ---------------------------------------------------------------- checking a command against the parser


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert actions, "build_parser() has no subcommands"
    return dict(actions[0].choices)


def command_problems(command: str, parser: argparse.ArgumentParser) -> list[str]:
    """Why ``command`` (``deit <subcommand> ...``) would not parse: unknown subcommand or flags."""
    command = command.replace("...", " ").replace("…", " ")
    command = re.sub(r"<[^<>]*>", "X", command)  # placeholders such as <class> or <hex>
    command = command.replace("[", " ").replace("]", " ")  # optional parts: [--json]
    words = command.split()[1:]  # after `deit`
    top_level = {option for action in parser._actions for option in action.option_strings}
    while words and words[0].startswith("-") and words[0] in top_level:
        words = words[1:]
    if not words:
        return [f"{command!r}: no subcommand"]
    name, arguments = words[0], words[1:]
    subparsers = subcommand_parsers(parser)
    if name not in subparsers:
        return [f"{command!r}: unknown subcommand {name!r}; deit has {sorted(subparsers)}"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args([name, "--help"])
            code: object = "no exit"
        except SystemExit as stop:
            code = stop.code
    problems = [] if code == 0 else [f"deit {name} --help: exit {code}, not 0"]
    options = {option for action in subparsers[name]._actions for option in action.option_strings}
    for word in arguments:
        flag = word.split("=", 1)[0].strip("'\"")
        if flag.startswith("--") and flag not in options:
            problems.append(f"{command!r}: deit {name} has no option {flag}")
    return problems


# ---------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_there_are_docs_pages():
    assert len(PAGES) > 5, f"expected README.md and docs/*.md pages, found {[page_id(p) for p in PAGES]}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    assert link_problems(page.read_text(encoding="utf-8"), page.parent) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_quoted_commands_parse(page, parser):
    problems = []
    for command in deit_commands(page.read_text(encoding="utf-8")):
        problems += command_problems(command, parser)
    assert problems == []


def test_the_docs_quote_many_commands():
    # guards the extraction itself: a regex that stopped matching would make the test above pass vacuously
    commands = [command for page in PAGES for command in deit_commands(page.read_text(encoding="utf-8"))]
    assert len(commands) > 30
    assert {command.split()[1] for command in commands} >= {"train", "eval", "export", "predict", "analyze"}


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_maps_every_page_and_every_page_links_back():
    readme = README.read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"README.md's documentation map does not link docs/{page.name}"
        assert "](../README.md)" in page.read_text(encoding="utf-8"), f"docs/{page.name} does not link back"


# ---------------------------------------------------------------- the checker can fail

BROKEN_PAGE = """\
# A page

## Good heading, with punctuation!

See [the README](README.md), [a heading](#good-heading-with-punctuation) and [a site](https://example.org/x).
A [broken link](no/such/file.md), [a missing anchor](#no-such-heading) and `[code](not/a/link.md)`.

```bash
# a comment: deit train --ignored-in-comment
deit train --config fashion_mnist \\
    --no-such-flag 3 --epochs 2   # deit eval --also-ignored
deit export --checkpoint c.pth --format onnx --output <file>.onnx ...
python -m deit train --seed=1 [--json]
deit fly --high
```

Inline: `deit predict --checkpoint c.pth a.png --top-k 3` and `deit eval --checkpoint c.pth
--nope`.
"""


def test_checkers_find_broken_links_and_unknown_flags(tmp_path, parser):
    (tmp_path / "README.md").write_text("# x\n", encoding="utf-8")
    problems = link_problems(BROKEN_PAGE, tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("no/such/file.md:")
    assert problems[1].startswith("#no-such-heading:")

    commands = deit_commands(BROKEN_PAGE)
    assert commands == [
        "deit train --config fashion_mnist --no-such-flag 3 --epochs 2",
        "deit export --checkpoint c.pth --format onnx --output <file>.onnx ...",
        "deit train --seed=1 [--json]",
        "deit fly --high",
        "deit predict --checkpoint c.pth a.png --top-k 3",
        "deit eval --checkpoint c.pth --nope",
    ]
    found = {command: command_problems(command, parser) for command in commands}
    assert found[commands[1]] == [] and found[commands[4]] == []
    assert len(found[commands[0]]) == 1 and "--no-such-flag" in found[commands[0]][0]
    assert len(found[commands[2]]) == 1 and "--json" in found[commands[2]][0]  # train has no --json
    assert "unknown subcommand 'fly'" in found[commands[3]][0]
    assert len(found[commands[5]]) == 1 and "--nope" in found[commands[5]][0]


def test_github_slugs():
    assert github_slug("Fine-tuning at a higher resolution, and other people's weights") == (
        "fine-tuning-at-a-higher-resolution-and-other-peoples-weights"
    )
    assert github_slug("Measured: how much do the unlabelled images buy?") == (
        "measured-how-much-do-the-unlabelled-images-buy"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
