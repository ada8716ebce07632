"""Every relative link of every Markdown file in the repository resolves.

For each `*.md` file git tracks (or would track: new files not yet committed count, ignored ones
such as runs/ do not), every inline link or image `[text](path)` / `[text](path#anchor)` and every
reference definition `[label]: path` outside code must name an existing file or directory, relative
to the Markdown file, inside the repository. Links with a scheme (https:, mailto:) and pure
`#anchor` links are not paths. Paths outside the repository (the shared corpora in ../shared) are
written in backticks, not as links: a link there would break in any other checkout. An anchor on a
link to a Markdown file must name one of its headings (GitHub's heading ids).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE = re.compile(r"!?\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(?P<target><[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[(?P<text>[^\]]+)\]:\s*(?P<target><[^>]*>|\S+)", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    """The repository's Markdown files: tracked, plus untracked ones git does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z",
                              "--", "*.md", "*.MD", "*.markdown"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
        names = sorted({n for n in out.split("\0") if n})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it instead
        skip = {".git", ".venv", "runs", "node_modules", ".pytest_cache"}
        names = sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*.md")
                       if not skip & set(p.relative_to(REPO).parts))
    return [REPO / n for n in names if (REPO / n).is_file()]


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links);
    line breaks are kept so line numbers stay right."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    return CODE_SPAN.sub(blank, FENCE.sub(blank, text))


def links(text: str) -> list[tuple[int, str, str]]:
    """(line, text, target) of every inline link, image and reference definition outside code."""
    text = strip_code(text)
    found = []
    for pattern in (INLINE, REFERENCE):
        for m in pattern.finditer(text):
            target = m.group("target").strip()
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            found.append((text.count("\n", 0, m.start()) + 1, m.group("text"), target))
    return sorted(found)


def github_slug(heading: str) -> str:
    """GitHub's id for a heading: link text kept, markup and punctuation dropped, lower case,
    spaces to hyphens."""
    heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    heading = re.sub(r"<[^>]+>", "", heading).strip().lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """The heading ids of a Markdown file (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", md.read_text()), re.M):
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(md: Path, root: Path = REPO) -> list[str]:
    """One line per link of `md` that does not resolve: the file, the line and the link named."""
    problems = []
    for line, text, target in links(md.read_text()):
        if not target or SCHEME.match(target):
            continue  # https:, mailto: ...
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part.split("?", 1)[0])
        where = f"{md.relative_to(root)}:{line}: [{text}]({target})"
        if not path_part:  # a pure #anchor: not a path
            continue
        resolved = ((root / path_part.lstrip("/")) if path_part.startswith("/")
                    else (md.parent / path_part)).resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where}: leaves the repository ({resolved}); name such paths in "
                            "backticks, not as links")
        elif not resolved.exists():
            problems.append(f"{where}: {resolved.relative_to(root.resolve())} does not exist")
        elif anchor and resolved.suffix.lower() in (".md", ".markdown") and resolved.is_file() \
                and unquote(anchor).lower() not in anchors(resolved):
            problems.append(f"{where}: {resolved.relative_to(root.resolve())} has no heading "
                            f"#{anchor}")
    return problems


FILES = markdown_files()


def test_the_repository_has_markdown_to_check():
    names = {str(p.relative_to(REPO)) for p in FILES}
    assert "README.md" in names and len(names) > 1, names


@pytest.mark.parametrize("md", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_every_relative_link_resolves(md):
    problems = broken_links(md)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_check_finds_broken_links(tmp_path):
    """The checker itself: a broken path, a path outside the tree and a missing heading fail,
    each named; working links, code, URLs and pure anchors pass."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Two words\n")
    (tmp_path / "data.json").write_text("{}")
    md = tmp_path / "README.md"
    md.write_text(
        "# Title\n\n"
        "[ok](docs/guide.md) [ok anchor](docs/guide.md#two-words) [dir](docs/) ![img](data.json)\n"
        "[web](https://example.com/x.md) [mail](mailto:a@b.c) [here](#title)\n"
        "`[in code](missing_in_code.md)`\n\n```\n[in a fence](missing_in_fence.md)\n```\n"
        "[gone](docs/missing.md) [outside](../shared/data/README.md)\n"
        "[bad anchor](docs/guide.md#three-words)\n"
        "[ref]: docs/also_missing.md\n")
    problems = broken_links(md, root=tmp_path)
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    assert "README.md:10: [gone](docs/missing.md)" in joined
    assert "[outside](../shared/data/README.md)" in joined and "leaves the repository" in joined
    assert "#three-words" in joined and "docs/also_missing.md" in joined
    assert "missing_in_code" not in joined and "missing_in_fence" not in joined


def test_github_heading_ids():
    assert github_slug("Selecting samples: `[selection]`") == "selecting-samples-selection"
    assert github_slug("Trainer efficiency on one H200 (2026-12-04)") == \
        "trainer-efficiency-on-one-h200-2026-12-04"
    assert github_slug("Hugging Face baseline: `hf_trainer_baseline.py`") == \
        "hugging-face-baseline-hf_trainer_baselinepy"
