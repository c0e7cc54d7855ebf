"""Pre-trained word vectors (GloVe text, word2vec text or binary) and the embedding matrix.

`load_vectors` reads only the words a run needs; `embedding_matrix` gives
every vocabulary word its vector where the file knows it (also through its
lower-cased, tokenized form) and a small random row elsewhere.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import numpy as np

from tl_keras.errors import fail
from tl_keras.text.model import PUNCTUATION
from tl_keras.text.sources import warn

# Size of random word vectors when there is no vectors file and no --embedding_dim.
DEFAULT_RANDOM_DIM = 100


# --------------------------------------------------------------------------
# Word vectors: GloVe text, word2vec text, word2vec binary
# --------------------------------------------------------------------------

@dataclasses.dataclass
class WordVectors:
    """Vectors read from a file (only the wanted words, when a set was given).

    Attributes:
        index: word -> row of `vectors`.
        vectors: float32 [N, dim].
        dim: vector size.
        format: "glove", "word2vec_text" or "word2vec_binary".
        rows_read: records in the file (all, not only the kept ones).
        rows_skipped: malformed records skipped.
        top: with `first`, the words of the file's first records, in file
            order, as the vectorizer produces them (ASCII lower case);
            words it can never produce (punctuation inside) are left out.
    """

    index: dict
    vectors: np.ndarray
    dim: int
    format: str
    rows_read: int
    rows_skipped: int
    top: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.index)


_W2V_HEADER = re.compile(rb"^\s*(\d+)\s+(\d+)\s*$")


def _parse_floats(fields: list, dim: int) -> Optional[np.ndarray]:
    if len(fields) != dim:
        return None
    try:
        v = np.asarray(fields, dtype=np.float32)
    except ValueError:
        return None
    return v if np.all(np.isfinite(v)) else None


def detect_vectors_format(path: str, flag: str = "embeddings") -> str:
    """Tells GloVe text, word2vec text and word2vec binary files apart by content.

    word2vec files start with a `COUNT DIM` header line; in the text variant
    the next line is a word and DIM numbers, in the binary one it is not.
    GloVe files have no header.
    """
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
            second = f.readline(1 << 20)
    except OSError as e:
        raise fail(flag, path, f"cannot read: {e.strerror or e}") from None
    m = _W2V_HEADER.match(first)
    if not m:
        return "glove"
    dim = int(m.group(2))
    try:
        fields = second.decode("utf-8").rstrip("\r\n").rstrip(" ").split(" ")
    except UnicodeDecodeError:
        return "word2vec_binary"
    if len(fields) == dim + 1 and _parse_floats(fields[1:], dim) is not None:
        return "word2vec_text"
    return "word2vec_binary"


def _binary_records(f, count: int, dim: int):
    """Yields (word, vector) of a word2vec binary file (after its header)."""
    width = 4 * dim
    for _ in range(count):
        chars = bytearray()
        while True:
            c = f.read(1)
            if not c:
                return  # shorter than its header says; the caller warns
            if c == b" ":
                break
            if c != b"\n" or chars:  # records may be separated by newlines
                chars += c
        raw = f.read(width)
        if len(raw) < width:
            return
        yield bytes(chars).decode("utf-8", errors="replace"), np.frombuffer(raw, "<f4")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def token_form(word: str) -> Optional[str]:
    """The vectorizer's token for a vectors-file word, or None if it can never produce it.

    `standardize_text` lower-cases ASCII letters and splits punctuation off
    words: "The" becomes "the"; "e.g." or "new york" never come out whole.
    """
    low = word.translate(_ASCII_LOWER)
    return low if re.sub(PUNCTUATION, r" \1 ", low).split() == [low] else None


def load_vectors(path: str, wanted: Optional[set] = None,
                 flag: str = "embeddings", first: int = 0) -> WordVectors:
    """Reads word vectors from a GloVe text, word2vec text or word2vec binary file.

    The file is streamed: with `wanted`, only those words are kept, so a
    multi-gigabyte file costs the memory of the vocabulary only. A wanted
    word found only in another case (a cased word2vec vocabulary against a
    lower-cased one) takes the first such vector; an exact match wins.

    Args:
        path: the vectors file (format detected from its content).
        wanted: the words to keep (e.g. a vocabulary); None keeps all.
        flag: the flag it came from, for error messages.
        first: also keep the words of the first `first` records (the most
            frequent ones, in GloVe and word2vec files), listed in `top`.

    Returns:
        WordVectors. Malformed records are skipped and counted (a warning
        names the first).

    Raises:
        ConfigError: missing or unreadable file, or no valid vector in it.
    """
    if not os.path.isfile(path):
        raise fail(flag, path, "no such file (expected GloVe or word2vec vectors)")
    fmt = detect_vectors_format(path, flag)
    exact: dict = {}
    folded: dict = {}
    top: dict = {}  # an ordered set
    read = skipped = 0
    first_bad = None
    dim = None

    def take(word: str, vec: np.ndarray) -> None:
        if read <= first:
            tok = token_form(word)
            if tok is not None:
                top.setdefault(tok, None)
        if wanted is None or word in wanted or word in top:
            exact.setdefault(word, vec)
        else:
            low = word.lower()
            if low in wanted or low in top:
                folded.setdefault(low, vec)

    if fmt == "word2vec_binary":
        with open(path, "rb") as f:
            count, dim = (int(g) for g in _W2V_HEADER.match(f.readline()).groups())
            for word, vec in _binary_records(f, count, dim):
                read += 1
                if np.all(np.isfinite(vec)):
                    take(word, vec.astype(np.float32))
                else:
                    skipped += 1
                    first_bad = first_bad or f"record {read} ({word!r})"
        if read < count:
            warn(f"{path}: its header announces {count} vectors, the file holds {read}")
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            first_line = 1
            if fmt == "word2vec_text":
                dim = int(_W2V_HEADER.match(f.readline().encode()).group(2))
                first_line = 2
            for n, raw in enumerate(f, first_line):
                line = raw.rstrip("\r\n").rstrip(" ")
                if not line:
                    continue
                read += 1
                if dim is None:  # GloVe: the first record sets the size
                    dim = line.count(" ")
                # Words may contain spaces (GloVe 840B has some): the last
                # `dim` fields are the numbers.
                parts = line.rsplit(" ", dim)
                word = parts[0]
                if (wanted is not None and read > first and len(parts) == dim + 1
                        and word not in wanted and word.lower() not in wanted):
                    continue  # not parsed: most of a big file is not wanted
                vec = _parse_floats(parts[1:], dim)
                if vec is None:
                    skipped += 1
                    first_bad = first_bad or f"line {n}"
                    continue
                take(word, vec)
    if skipped:
        warn(f"{path}: skipped {skipped} malformed vector record(s), first at {first_bad}")
    if read - skipped <= 0 or not dim:
        raise fail(flag, path, "holds no word vectors (expected GloVe `word v1 .. vD` lines "
                   "or a word2vec text/binary file)")
    merged = {**folded, **exact}
    index = {w: i for i, w in enumerate(merged)}
    vectors = (np.stack(list(merged.values())) if merged
               else np.zeros((0, dim), np.float32))
    return WordVectors(index, vectors, dim, fmt, read, skipped, list(top))


def embedding_matrix(vocabulary: list[str], vectors: Optional[WordVectors], dim: int,
                     seed: int, train_ids: Optional[np.ndarray] = None,
                     training_words: Optional[int] = None,
                     val_ids: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict]:
    """Initial embedding rows for a vocabulary.

    Words found in `vectors` get their vector. The other words get small
    random rows: normal with the standard deviation of the found vectors (so
    they are on the same scale, as in Kim 2014), or 0.1 without vectors.
    Padding (row 0) and `[UNK]` (row 1) are zero: a word the vocabulary
    lacks carries no information, and when the vocabulary holds every
    training word `[UNK]` never occurs in training, so a random row would
    stay an arbitrary signal at prediction time.

    Args:
        vocabulary: the vectorizer's vocabulary ("" and "[UNK]" first).
        vectors: pre-trained vectors, or None for random embeddings.
        dim: the embedding size (must equal `vectors.dim`).
        seed: seeds the random rows.
        train_ids: the vectorized training texts, to count token coverage.
        training_words: how many words (after padding and [UNK]) come from
            the training texts; the rest came from the vectors file only
            (`extend_vocabulary`). None: all of them.
        val_ids: the vectorized validation texts, to count their token
            coverage.

    Returns:
        (matrix float32 [len(vocabulary), dim], coverage dict): `words` (the
        vocabulary without padding and [UNK]), `training_words`,
        `vectors_only` (words added from the vectors file, all found),
        `found` (training words with a vector), `word_coverage` (found /
        training words) and, with `train_ids` / `val_ids`,
        `token_coverage` / `val_token_coverage` (share of the training /
        validation tokens the model sees that have a pre-trained vector;
        [UNK] counts as not covered).
    """
    rng = np.random.default_rng(seed)
    n = len(vocabulary)
    found = np.zeros(n, dtype=bool)
    if vectors is not None and len(vectors):
        scale = float(vectors.vectors.std())
    else:
        scale = 0.1
    matrix = rng.normal(0.0, scale, size=(n, dim)).astype(np.float32)
    matrix[:2] = 0.0
    if vectors is not None:
        for i, word in enumerate(vocabulary[2:], start=2):
            row = vectors.index.get(word)
            if row is not None:
                matrix[i] = vectors.vectors[row]
                found[i] = True
    words = max(n - 2, 0)
    train_words = words if training_words is None else min(training_words, words)
    n_found = int(found[2:2 + train_words].sum())
    coverage = {"words": words, "training_words": train_words,
                "vectors_only": words - train_words, "found": n_found,
                "word_coverage": round(n_found / train_words, 4) if train_words else 0.0}
    for key, ids in (("token_coverage", train_ids), ("val_token_coverage", val_ids)):
        if ids is not None:
            seen = ids[ids > 0]
            coverage[key] = round(float(found[seen].mean()), 4) if seen.size else 0.0
    return matrix, coverage
