"""The documentation's promises that a reader can check: code blocks fit the page, the
README names only files in the repository, and the message fields it shows are real."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import ioserver
import ports

# No I/O core of $IOSERVER_CORE's choice (the docs' sources): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: alabaster's fixed sizes (px): the sidebar, the body's and a code block's side paddings,
#: its base font size; and DejaVu Sans Mono's advance (em), the widest of its code fonts.
SIDEBAR, BODY_PADDING, PRE_PADDING, FONT_SIZE, MONO_ADVANCE = 220, 60, 60, 17, 0.602
#: The widest screen the page must fit without a horizontal scroll bar (px), with a
#: vertical scroll bar of 15 px.
SCREEN = 1280 - 15


def theme_option(name: str) -> str:
    match = re.search(rf'"{name}":\s*"([^"]+)"', (DOCS / "conf.py").read_text())
    assert match, f"docs/conf.py sets no html_theme_options[{name!r}]"
    return match.group(1)


def code_columns() -> int:
    """How many monospace columns a code block of the built site shows."""
    page = int(theme_option("page_width").removesuffix("px"))
    assert page <= SCREEN, f"page_width {page}px does not fit a 1280 px screen"
    em = float(theme_option("code_font_size").removesuffix("em"))
    width = page - SIDEBAR - BODY_PADDING - PRE_PADDING
    return int(width / (FONT_SIZE * em * MONO_ADVANCE))


def code_block_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each line of each literal block and code block in ``path``,
    without the block's indentation; and the lines of literalinclude'd files."""
    lines = path.read_text().splitlines()
    found: list[tuple[int, str]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        include = re.match(r"\.\. literalinclude::\s*(\S+)", stripped)
        if include:
            included = (path.parent / include.group(1)).resolve()
            found += [(0, f"{included.name}: {text}") for text in included.read_text().splitlines()]
        starts_block = stripped.startswith((".. code-block::", ".. code::", ".. sourcecode::")) or (
            stripped.endswith("::") and not stripped.startswith("..")
        )
        index += 1
        if not starts_block:
            continue
        indent = len(line) - len(line.lstrip())
        block_indent = None
        while index < len(lines):
            text = lines[index]
            if text.strip():
                current = len(text) - len(text.lstrip())
                if current <= indent:
                    break
                if block_indent is None:
                    if text.strip().startswith(":"):  # a directive option
                        index += 1
                        continue
                    block_indent = current
                found.append((index + 1, text[block_indent:]))
            index += 1
    return found


def test_every_code_block_fits_the_text_column_at_1280_px() -> None:
    columns = code_columns()
    assert columns >= 100, f"a code block shows {columns} columns; the code is 100 wide"
    too_wide = [
        f"{path.relative_to(ROOT)}:{number}: {len(text)} columns"
        for path in sorted(DOCS.rglob("*.rst"))
        if "_build" not in path.parts
        for number, text in code_block_lines(path)
        if len(text.split(": ", 1)[-1] if number == 0 else text) > columns
    ]
    assert not too_wide, "\n".join(too_wide)


def test_the_readme_names_only_files_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", readme)  # [text](target), ![alt](target)
    spans = [
        span
        for span in re.findall(r"`([^`\s]+)`", readme)
        if re.search(r"\.(md|rst|py|toml|json|svg|c)$", span) and "/" in span
    ]
    missing = [
        name
        for name in links + spans
        if not name.startswith(("http://", "https://"))
        and ("NAME" not in name)
        and (".." in Path(name).parts or not (ROOT / name).exists())
    ]
    assert not missing, f"the README names files outside the repository: {missing}"


def test_the_message_fields_the_docs_show_are_real() -> None:
    """``ExitStatus(code)`` in the README was wrong: the field is ``status``."""
    names = {
        cls.__name__: {field.name for field in dataclasses.fields(cls)}
        for cls in (ports.ExitStatus, ports.Closed, ports.Error, ports.Datagram)
    }
    texts = [ROOT / "README.md", *sorted(DOCS.rglob("*.rst"))]
    wrong = []
    for path in texts:
        for name, arguments in re.findall(
            r"\b(ExitStatus|Closed|Error|Datagram)\(([^)]*)\)", path.read_text()
        ):
            for argument in filter(None, (a.strip() for a in arguments.split(","))):
                word = argument.split("=")[0].strip()
                if re.fullmatch(r"[a-z_]+", word) and word not in names[name]:
                    wrong.append(f"{path.relative_to(ROOT)}: {name}({arguments})")
    assert not wrong, f"fields that do not exist: {wrong}; the real ones: {names}"
    assert ioserver.ExitStatus is ports.ExitStatus
