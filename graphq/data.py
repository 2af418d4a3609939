"""The text graphq evaluates and calibrates on, shipped with the package (see data/wikitext-2/README.md).

- ``wiki.test.raw``: WikiText-2 test split, one row per line: perplexity, and the sentences that
  encoders are scored on (:func:`wikitext_sentences`).
- ``wiki.valid.tokens``: WikiText-2 validation split, tokenised form: calibration only, never evaluation.

Sentences (:func:`wikitext_sentences`): each non-empty row that is not a heading (``= ... =``) is
split after every `` . `` (WikiText's tokenised full stop) followed by a token that starts with an
upper-case letter, a digit or a quote; WikiText's ``@-@``, ``@,@`` and ``@.@`` joiners are undone
(``a @-@ b`` -> ``a-b``). A sentence is kept when it has ``min_words`` to ``max_words``
whitespace-separated words and no ``<unk>``; the first ``limit`` kept, in file order.
"""

from __future__ import annotations

import re
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


_SENTENCE_END = re.compile(r"(?<= \.) (?=[A-Z0-9\"'])")
_JOINERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def wikitext_sentences(path: Path = WIKITEXT_TEST, *, limit: int = 512, min_words: int = 8,
                       max_words: int = 64) -> list[str]:
    """The first ``limit`` sentences of a WikiText file (module docstring), fewer if it has fewer."""
    if limit < 1 or min_words < 1 or max_words < min_words:
        raise GraphqError(f"sentences: need limit >= 1 and 1 <= min_words <= max_words, got {limit}, {min_words}, {max_words}")
    sentences = []
    for row in read_text(path).splitlines():
        row = row.strip()
        if not row or row.startswith("="):
            continue
        for sentence in _SENTENCE_END.split(row):
            for joiner, replacement in _JOINERS:
                sentence = sentence.replace(joiner, replacement)
            words = len(sentence.split())
            if min_words <= words <= max_words and "<unk>" not in sentence:
                sentences.append(sentence)
                if len(sentences) == limit:
                    return sentences
    return sentences
