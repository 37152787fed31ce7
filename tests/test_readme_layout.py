"""The README's Layout names the modules a newcomer will find: a renamed or split module left it naming files
that were gone (serve/remover, requests, feedback, gate) and leaving out a dozen that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _layout_entry(folder: str) -> tuple[set[str], set[str]]:
    """The README Layout block's entry for `folder` (its line and the indented ones after it): every word, and
    the names it lists as modules (after the first colon, outside parentheses, which hold prose)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout") :]
    block = block[block.index("```") + 3 :]
    lines = block[: block.index("```")].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{folder}/"))
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        entry.append(line)
    text = " ".join(entry)
    listed = re.sub(r"\([^()]*\)", "", text.split(":", 1)[1])
    return set(re.findall(r"[a-z_]+", text)), set(re.findall(r"[a-z_]+", listed)) - {"proto"}


def _modules(folder: Path) -> set[str]:
    generated = {"rorem_pb2", "rorem_pb2_grpc"}  # named as "rorem.proto (+ stubs)"
    return {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem not in generated} | {
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_")
    }


def test_the_layout_names_every_module_of_engines_and_serve_and_none_that_is_gone():
    for folder in ("engines", "serve"):
        (words, listed), present = _layout_entry(folder), _modules(REPO / folder)
        present |= {"rorem"} if folder == "serve" else set()  # rorem.proto
        assert present - words == set(), f"README Layout: {folder}/ leaves out {sorted(present - words)}"
        assert listed - present == set(), f"README Layout: {folder}/ names what is not there: {sorted(listed - present)}"
