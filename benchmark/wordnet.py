"""WordNet for EDA synonym replacement, read with NLTK from the Debian package ``wordnet-base``.

Debian's /usr/share/wordnet holds the WordNet 3.0 database files but not the ``lexnames`` file
that NLTK's reader opens; its contents are the table of the lexnames(5) man page, shipped here
as package data. When the folder lacks the file, a cache folder with copies of its files plus ``lexnames``
is made under ``$XDG_CACHE_HOME/poisonbench`` (default ~/.cache/poisonbench), once.
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path

DEBIAN_ROOT = "/usr/share/wordnet"
LEXNAMES = Path(__file__).parent / "data" / "lexnames"


class WordNetNotFoundError(FileNotFoundError):
    """No WordNet database was found."""


def find_root() -> Path:
    """Folder with the WordNet database (``$POISONBENCH_WORDNET``, else the Debian path).

    Raises WordNetNotFoundError saying how to install it.
    """
    env = os.environ.get("POISONBENCH_WORDNET")
    candidates = [Path(env)] if env else []
    candidates.append(Path(DEBIAN_ROOT))
    for c in candidates:
        if (c / "data.noun").is_file() and (c / "index.noun").is_file():
            return c
    raise WordNetNotFoundError(
        "WordNet not found (looked in: " + ", ".join(map(str, candidates)) + "). EDA text augmentation "
        "(defenses roclip and aug-only) needs it: `sudo apt-get install wordnet-base`, or set "
        "POISONBENCH_WORDNET to a WordNet 3.0 dict folder (data.noun, index.noun, ...)."
    )


def _reader_root(root: Path) -> Path:
    if (root / "lexnames").is_file():
        return root
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "poisonbench" / "wordnet"
    if (cache / "lexnames").is_file():
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    # Copies, not symlinks: NLTK refuses files that resolve outside the reader's root.
    # Each file is written then renamed and lexnames comes last, so a concurrent
    # process never sees a half-made folder.
    files = [(f.name, f.read_bytes()) for f in root.iterdir() if f.is_file()]
    for name, data in files + [("lexnames", LEXNAMES.read_bytes())]:
        with tempfile.NamedTemporaryFile("wb", dir=cache, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, cache / name)
    return cache


@functools.lru_cache(maxsize=1)
def wordnet():
    """NLTK's WordNetCorpusReader over the local database (loaded once per process)."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = find_root()
    reader_root = _reader_root(root)
    # NLTK only opens files under its data path; this folder holds the WordNet files we chose.
    if str(reader_root) not in nltk.data.path:
        nltk.data.path.append(str(reader_root))
    class LocalWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # Maps synsets to NLTK's own downloaded copy for multilingual (OMW) data, which
            # we neither have nor need; without this the reader looks for nltk_data/wordnet.
            return None

    with warnings.catch_warnings():  # "multilingual functions are not available": not needed
        warnings.simplefilter("ignore", UserWarning)
        return LocalWordNet(str(reader_root), None)


@functools.lru_cache(maxsize=100_000)
def synonyms(word: str) -> tuple[str, ...]:
    """WordNet synonyms of ``word`` (lower-case, letters and spaces only, ``word`` itself excluded),
    in WordNet's order. Empty for words WordNet does not know."""
    out: list[str] = []
    for syn in wordnet().synsets(word):
        for lemma in syn.lemmas():
            s = lemma.name().replace("_", " ").replace("-", " ").lower()
            s = "".join(ch for ch in s if ch == " " or "a" <= ch <= "z")
            if s and s != word and s not in out:
                out.append(s)
    return tuple(out)
