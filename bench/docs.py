"""The one way benchmarks write their tables into ``docs/``: a section between markers.

A section named ``NAME`` is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``;
writing it replaces that text and keeps the rest of the file, or appends the section when the
file does not have it yet (``training.experiment.write_block`` does the same for the training
reports; training imports no bench code).
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between the ``name`` markers of ``path`` (appended, with its markers, if absent)."""
    begin, end = markers(name)
    text = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{body.strip(chr(10))}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
