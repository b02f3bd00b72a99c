"""WordNet for EDA synonym replacement, read with NLTK from the Debian package ``wordnet-base``.

Debian's /usr/share/wordnet holds the WordNet 3.0 database files but not the ``lexnames`` file
that NLTK's reader opens; its contents are the table of the lexnames(5) man page, shipped here
as package data. When the folder lacks the file, a cache folder with copies of its files plus ``lexnames``
is made under ``$XDG_CACHE_HOME/poisonbench`` (default ~/.cache/poisonbench), once per source folder.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

DEBIAN_ROOT = "/usr/share/wordnet"
LEXNAMES = Path(__file__).parent / "data" / "lexnames"
DATABASE_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv"))


class WordNetNotFoundError(FileNotFoundError):
    """No WordNet database was found."""


def find_root() -> Path:
    """Folder with the WordNet database (``$POISONBENCH_WORDNET``, else the Debian path).

    Raises WordNetNotFoundError saying how to install it.
    """
    env = os.environ.get("POISONBENCH_WORDNET")
    if env:
        if not all((Path(env) / f).is_file() for f in DATABASE_FILES):
            raise WordNetNotFoundError(
                f"POISONBENCH_WORDNET={env} is not a WordNet 3.0 dict folder (it needs "
                f"{', '.join(DATABASE_FILES)}); fix or unset it (the default is {DEBIAN_ROOT})."
            )
        return Path(env)
    candidates = [Path(DEBIAN_ROOT)]
    for c in candidates:
        if all((c / f).is_file() for f in DATABASE_FILES):
            return c
    raise WordNetNotFoundError(
        "WordNet not found (looked in: " + ", ".join(map(str, candidates)) + "). EDA text augmentation "
        "(defenses roclip and aug-only) needs it: `sudo apt-get install wordnet-base`, or set "
        "POISONBENCH_WORDNET to a WordNet 3.0 dict folder (data.noun, index.noun, ...)."
    )


def _reader_root(root: Path) -> Path:
    if (root / "lexnames").is_file():
        return root
    # One cache folder per source folder, so a cache made from another database is never reused.
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "poisonbench" / f"wordnet-{key}"
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


def wordnet():
    """NLTK's WordNetCorpusReader over the local database (``find_root``), loaded once per folder.

    Raises WordNetNotFoundError when the database is missing or unreadable.
    """
    return _reader(find_root())


@functools.lru_cache(maxsize=4)
def _reader(root: Path):
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

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
        try:
            return LocalWordNet(str(reader_root), None)
        except (OSError, ValueError, AssertionError) as e:
            raise WordNetNotFoundError(f"WordNet in {root} is unreadable ({type(e).__name__}: {e})") from e


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
