"""The text graphq evaluates and calibrates on, shipped with the package (see data/wikitext-2/README.md).

- ``wiki.test.raw``: WikiText-2 test split, one row per line: perplexity only.
- ``wiki.valid.tokens``: WikiText-2 validation split, tokenised form: calibration only, never evaluation.
"""

from __future__ import annotations

from pathlib import Path

from graphq.errors import GraphqError

DATA_DIR = Path(__file__).parent / "data" / "wikitext-2"
WIKITEXT_TEST = DATA_DIR / "wiki.test.raw"
WIKITEXT_VALID = DATA_DIR / "wiki.valid.tokens"


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, with a clear error for a missing, empty or non-UTF-8 file."""
    if Path(path).exists() and not Path(path).is_file():  # a folder, or a FIFO / device that could block forever
        raise GraphqError(f"{path}: not a regular file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise GraphqError(f"{path}: no such text file") from error
    except UnicodeDecodeError as error:
        raise GraphqError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise GraphqError(f"{path}: cannot read ({error.strerror or error})") from error
    if not text.strip():
        raise GraphqError(f"{path}: the text file is empty")
    return text
