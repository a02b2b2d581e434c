"""Turn the hand-written entries of tests/fixtures/dictd/NAME.txt into real dictd files (shared by the data tests)."""
from __future__ import annotations

from pathlib import Path

from lm_lexicon.data.dictd import write_dictd

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "dictd"
NAMES = ("gcide", "foldoc", "jargon", "devil")


def fixture_articles(name: str) -> list[tuple[list[str], str]]:
    """``[(headwords, article text)]`` from ``NAME.txt``: articles follow ``%% headword | alias`` lines."""
    out: list[tuple[list[str], str]] = []
    headwords: list[str] | None = None
    lines: list[str] = []

    def flush() -> None:
        if headwords is not None:
            out.append((headwords, "\n".join(lines).rstrip("\n") + "\n\n"))

    for line in (FIXTURES / f"{name}.txt").read_text(encoding="utf-8").split("\n"):
        if line.startswith("%% "):
            flush()
            headwords, lines = [h.strip() for h in line[3:].split("|")], []
        else:
            lines.append(line)
    flush()
    return out


def build_dictd(directory: Path, names: tuple[str, ...] = NAMES) -> Path:
    """Write every named fixture dictionary into ``directory`` (the ``dictd_dir`` of the tests)."""
    for name in names:
        write_dictd(directory, name, fixture_articles(name))
    return directory


def index_line(directory: Path, name: str, headword: str) -> int:
    """The 1-based line of ``headword`` in ``NAME.index`` (write_dictd sorts the index)."""
    lines = (directory / f"{name}.index").read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.split("\t")[0] == headword)
