"""Text classification with pre-trained word vectors: sources, vectors, vocabulary, model.

    texts (raw strings)
      -> TextVectorization ("vectorizer": standardize_text, whitespace split,
         vocabulary of the training data, padded/cut to sequence_length)
      -> Embedding ("embedding": GloVe/word2vec rows where known, small random
         rows elsewhere)
      -> encoder ("encoder": pool | cnn | lstm | gru)
      -> Dropout -> Dense(float32, softmax) ("head")

Everything a prediction needs lives in the model, so `model.keras` and the
SavedModel take raw strings. The token-id part is also a model of its own
(`TextClassifier.ids_model`): training runs on token ids vectorized once,
which is what makes both stages cheap.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import sys
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tl_keras import data as data_lib
from tl_keras.config import fail

TEXT_EXTENSIONS = (".txt",)
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
ENCODERS = ("pool", "cnn", "lstm", "gru")
CNN_WIDTHS = (3, 4, 5)
# Longest sequence whose RNN is unrolled (see _encoder).
UNROLL_MAX_LENGTH = 64
EMBEDDING_LAYER = "embedding"
VECTORIZER_LAYER = "vectorizer"
HEAD_LAYER = "head"
# Size of random word vectors when there is no vectors file and no --embedding_dim.
DEFAULT_RANDOM_DIM = 100


def _warn(msg: str) -> None:
    print(f"[tl_keras] warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Sources: a folder of class subfolders of .txt files, a CSV/TSV, tfds:NAME
# --------------------------------------------------------------------------

def _read_text_file(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        _warn(f"skipped {path}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:
        _warn(f"skipped {path}: {e.strerror or e}")
    return None


def _folder_source(root: str, flag: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of ROOT/CLASS/**/*.txt, one example per file."""
    if not os.path.isdir(root):
        raise fail(flag, root, "no such folder or file")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    texts, labels = [], []
    for c in classes:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(TEXT_EXTENSIONS):
                    continue
                text = _read_text_file(os.path.join(dirpath, name))
                if text is not None:
                    texts.append(text)
                    labels.append(c)
    if not texts:
        raise fail(flag, root, "no class subfolders with .txt files "
                   "(expected ROOT/CLASS/file.txt, or a .csv/.tsv file with text,label columns)")
    return texts, labels


def _table_source(path: str, flag: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of a CSV/TSV whose header names `text` and `label` columns."""
    delimiter = TABLE_DELIMITERS[os.path.splitext(path)[1].lower()]
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one field
    texts, labels, bad = [], [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter=delimiter)
            header = [h.strip().lower() for h in next(rows, [])]
            if "text" not in header or "label" not in header:
                raise fail(flag, path, f"its header {header[:6]} lacks a 'text' and a 'label' "
                           "column (the first row must name them)")
            ti, li = header.index("text"), header.index("label")
            for row in rows:
                if not row:
                    continue  # blank line
                if len(row) <= max(ti, li) or not row[li].strip():
                    bad.append(rows.line_num)
                    continue
                texts.append(row[ti])
                labels.append(row[li].strip())
    except UnicodeDecodeError as e:
        raise fail(flag, path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise fail(flag, path, f"not a readable {delimiter!r}-separated file: {e}") from None
    if bad:
        _warn(f"{path}: skipped {len(bad)} row(s) without a label, first at line {bad[0]}")
    if not texts:
        raise fail(flag, path, "no rows with a text and a label")
    return texts, labels


def _tfds_source(spec: str, flag: str, default_split: str,
                 data_dir: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of `tfds:NAME[:SPLIT]` with a Text and a ClassLabel feature."""
    import tensorflow_datasets as tfds

    builder, split = data_lib.tfds_builder(spec, flag, default_split, data_dir)
    feats = builder.info.features
    text_key = next((k for k, v in feats.items() if isinstance(v, tfds.features.Text)), None)
    label_key = next((k for k, v in feats.items() if isinstance(v, tfds.features.ClassLabel)), None)
    if text_key is None or label_key is None:
        raise fail(flag, spec, "TFDS dataset has no text feature with a class label")
    ds = data_lib.tfds_prepare(builder, split, spec, flag,
                               "--data at a local folder or .csv/.tsv file")
    names = list(feats[label_key].names)
    texts, labels = [], []
    for ex in ds.as_numpy_iterator():
        texts.append(ex[text_key].decode("utf-8", errors="replace"))
        labels.append(names[int(ex[label_key])])
    if not texts:
        raise fail(flag, spec, f"split {split!r} is empty")
    return texts, labels


def load_text_source(spec: str, flag: str, class_names: Optional[list[str]] = None,
                     tfds_split: str = "train", tfds_data_dir: str = ""
                     ) -> tuple[list[str], data_lib.Split]:
    """Reads one labelled text source named by a flag.

    Args:
        spec: a folder of class subfolders of `.txt` files (one example per
            file), a `.csv`/`.tsv` file with a header naming `text` and `label`
            columns, or `tfds:NAME[:SPLIT]`.
        flag: the flag it came from, for error messages.
        class_names: the training classes (None when reading training data:
            then the sorted label names found).
        tfds_split: TFDS split used when the spec names none.
        tfds_data_dir: where TFDS keeps its data.

    Returns:
        (class names, split whose items are the texts).
    """
    if not spec:
        raise fail(flag, spec, "required: a folder of class subfolders of .txt files, "
                   "a .csv/.tsv file with text,label columns, or tfds:NAME")
    if spec.startswith("tfds:"):
        texts, labels = _tfds_source(spec, flag, tfds_split, tfds_data_dir)
    elif os.path.splitext(spec)[1].lower() in TABLE_DELIMITERS:
        if not os.path.isfile(spec):
            raise fail(flag, spec, "no such file")
        texts, labels = _table_source(spec, flag)
    else:
        texts, labels = _folder_source(spec, flag)
    found = sorted(set(labels))
    if class_names is None:
        class_names = found
    else:
        unknown = [c for c in found if c not in class_names]
        if unknown:
            raise fail(flag, spec, f"class {unknown[0]!r} does not occur in the training data")
    index = {c: i for i, c in enumerate(class_names)}
    return class_names, data_lib.Split(texts, np.asarray([index[l] for l in labels], np.int64),
                                       spec)


def load_text_dataset(data: str, val_data: str = "", test_data: str = "",
                      val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 42,
                      tfds_split: str = "train", tfds_data_dir: str = "") -> data_lib.Dataset:
    """Resolves the train/val/test splits of a text run.

    Held-out splits are made exactly as `data.load_dataset` makes them for
    images: without `test_data`, a stratified `test_fraction` (seed) first;
    without `val_data`, a stratified `val_fraction` of the rest (seed + 1).
    """
    class_names, train = load_text_source(data, "data", None, tfds_split, tfds_data_dir)
    test = None
    if test_data:
        _, test = load_text_source(test_data, "test_data", class_names, tfds_split,
                                   tfds_data_dir)
    elif test_fraction > 0:
        test_idx, rest = data_lib.stratified_split(train.labels, [test_fraction], seed)
        test, train = train.subset(test_idx), train.subset(rest)
    if val_data:
        _, val = load_text_source(val_data, "val_data", class_names, tfds_split, tfds_data_dir)
    else:
        val_idx, rest = data_lib.stratified_split(train.labels, [val_fraction], seed + 1)
        val, train = train.subset(val_idx), train.subset(rest)
    if len(class_names) < 2:
        raise fail("data", data, f"found {len(class_names)} class(es); "
                   "a classifier needs at least 2")
    for name, n in zip(class_names, train.class_counts(len(class_names))):
        if n == 0:
            raise fail("data", data, f"class {name!r} has no training texts")
    if len(val) == 0:
        raise fail("val_data" if val_data else "val_fraction", val_data or val_fraction,
                   "validation split is empty")
    return data_lib.Dataset(class_names, train, val, test)


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
    return low if re.sub(_PUNCTUATION, r" \1 ", low).split() == [low] else None


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
            _warn(f"{path}: its header announces {count} vectors, the file holds {read}")
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
        _warn(f"{path}: skipped {skipped} malformed vector record(s), first at {first_bad}")
    if read - skipped <= 0 or not dim:
        raise fail(flag, path, "holds no word vectors (expected GloVe `word v1 .. vD` lines "
                   "or a word2vec text/binary file)")
    merged = {**folded, **exact}
    index = {w: i for i, w in enumerate(merged)}
    vectors = (np.stack(list(merged.values())) if merged
               else np.zeros((0, dim), np.float32))
    return WordVectors(index, vectors, dim, fmt, read, skipped, list(top))


# --------------------------------------------------------------------------
# Vocabulary and the embedding matrix
# --------------------------------------------------------------------------

# Punctuation becomes tokens of its own ("great!" -> "great !"), as in the
# tokenization GloVe and word2vec were trained on. Apostrophes and hyphens
# stay inside words ("don't", "well-made").
_PUNCTUATION = r'([!"#$%&()*+,./:;<=>?@\[\\\]^_`{|}~])'


@keras.saving.register_keras_serializable(package="tl_keras")
def standardize_text(texts):
    """Lower-cases and splits punctuation off words (the vectorizer's standardize)."""
    texts = tf.strings.lower(texts)
    return tf.strings.regex_replace(texts, _PUNCTUATION, r" \1 ")


def build_vectorizer(texts: list[str], max_tokens: int, sequence_length: int
                     ) -> keras.layers.TextVectorization:
    """A TextVectorization layer whose vocabulary is the training texts' most frequent words.

    Index 0 pads, index 1 is `[UNK]` (words outside the vocabulary).
    """
    vectorizer = keras.layers.TextVectorization(
        max_tokens=max_tokens, standardize=standardize_text, split="whitespace",
        output_mode="int", output_sequence_length=sequence_length, name=VECTORIZER_LAYER)
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(list(texts)).batch(1024))
    return vectorizer


def extend_vocabulary(vectorizer: keras.layers.TextVectorization, words: list[str]
                      ) -> tuple[keras.layers.TextVectorization, int]:
    """A vectorizer whose vocabulary is that of `vectorizer` followed by the `words` it lacks.

    The training vocabulary keeps its ids (most frequent first); the added
    words (e.g. the most frequent words of a vectors file) come after it, so
    texts at prediction time find them instead of `[UNK]`.

    Returns:
        (vectorizer, number of words added); the same vectorizer when none is.
    """
    vocab = [str(w) for w in vectorizer.get_vocabulary()]
    have = set(vocab)
    extra = [w for w in dict.fromkeys(words) if w not in have and w]
    if not extra:
        return vectorizer, 0
    extended = keras.layers.TextVectorization(
        max_tokens=None, standardize=standardize_text, split="whitespace", output_mode="int",
        output_sequence_length=vectorizer.get_config()["output_sequence_length"],
        name=VECTORIZER_LAYER)
    extended.set_vocabulary(vocab[2:] + extra)  # padding and [UNK] are put first again
    return extended, len(extra)


def _batches(texts: list[str], batch_size: int) -> tf.data.Dataset:
    """`texts` as ordered string batches (see `data.steady`)."""
    return data_lib.steady(tf.data.Dataset.from_tensor_slices(list(texts)).batch(batch_size))


def vectorize(vectorizer: keras.layers.TextVectorization, texts: list[str],
              batch_size: int = 1024) -> np.ndarray:
    """Token ids int64 [N, sequence_length] of `texts`."""
    parts = [vectorizer(b).numpy() for b in _batches(texts, batch_size)]
    if not parts:
        return np.zeros((0, vectorizer.get_config()["output_sequence_length"] or 0), np.int64)
    return np.concatenate(parts).astype(np.int64)


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


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="tl_keras")
class MeanMaxPooling(keras.layers.Layer):
    """Mean and max of word vectors over the words of each text, concatenated.

    Padding is left out of both through the embedding's mask (a text with no
    words pools to zeros).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x, mask=None):
        if mask is None:
            return ops.concatenate([ops.mean(x, axis=1), ops.max(x, axis=1)], axis=-1)
        m = ops.expand_dims(ops.cast(mask, x.dtype), -1)
        count = ops.sum(m, axis=1)
        mean = ops.sum(x * m, axis=1) / ops.maximum(count, 1.0)
        big = ops.convert_to_tensor(1e4, dtype=x.dtype)
        mx = ops.max(x - (1.0 - m) * big, axis=1)
        mx = ops.where(count > 0, mx, ops.zeros_like(mx))
        return ops.concatenate([mean, mx], axis=-1)

    def compute_mask(self, x, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[-1])


def _encoder(x, encoder: str, units: int):
    """Token vectors [N, L, D] -> one vector per text."""
    if encoder == "pool":
        # SWEM-concat (Shen et al. 2018): mean and max of the word vectors, then an MLP layer.
        x = MeanMaxPooling(name="encoder_pool")(x)
        return keras.layers.Dense(units, activation="relu", name="encoder")(x)
    if encoder == "cnn":
        # Kim (2014): filters of several widths, ReLU, max over time.
        pooled = [keras.layers.GlobalMaxPooling1D(name=f"encoder_max_{w}")(
                  keras.layers.Conv1D(units, w, activation="relu", name=f"encoder_conv_{w}")(x))
                  for w in CNN_WIDTHS]
        return keras.layers.Concatenate(name="encoder")(pooled)
    # A bidirectional RNN read out by mean and max over its states at the
    # words (the mask leaves padding out), as InferSent's BiLSTM-max.
    cell = keras.layers.LSTM if encoder == "lstm" else keras.layers.GRU
    # Unrolling short sequences makes the RNN several times faster on CPU
    # (same math); long ones stay a loop to keep the graph small.
    unroll = x.shape[1] is not None and x.shape[1] <= UNROLL_MAX_LENGTH
    x = keras.layers.Bidirectional(cell(units, return_sequences=True, unroll=unroll),
                                   name="encoder_rnn")(x)
    return MeanMaxPooling(name="encoder")(x)


@dataclasses.dataclass
class TextClassifier:
    """The built text model and its parts.

    Attributes:
        model: raw strings [N] -> probabilities; saved and exported.
        ids_model: token ids [N, L] -> probabilities, sharing every layer
            (but the vectorizer) with `model`; what both stages train.
        vectorizer: the TextVectorization layer.
        embedding: the Embedding layer (frozen in stage 1).
    """

    model: keras.Model
    ids_model: keras.Model
    vectorizer: keras.layers.TextVectorization
    embedding: keras.layers.Embedding


def build_text_classifier(vectorizer: keras.layers.TextVectorization, matrix: np.ndarray,
                          num_classes: int, encoder: str = "cnn", units: int = 100,
                          dropout: float = 0.5, train_embeddings: bool = False,
                          embedding_dropout: float = 0.0) -> TextClassifier:
    """Builds strings -> vectorizer -> embedding -> encoder -> dropout -> softmax head.

    Args:
        vectorizer: an adapted TextVectorization layer.
        matrix: initial embedding rows, [vocabulary size, dim].
        num_classes: number of output classes.
        encoder: "pool" (mean+max of the word vectors, then a ReLU layer),
            "cnn" (widths 3, 4, 5, max over time), "lstm" or "gru"
            (bidirectional, mean+max over its states).
        units: hidden units (pool), filters per width (cnn) or units per
            direction (lstm, gru).
        dropout: dropout rate before the head.
        train_embeddings: whether the embeddings start trainable.
        embedding_dropout: rate at which whole word vectors are dropped
            (SpatialDropout1D) before the encoder, in training only.

    Returns:
        A TextClassifier.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"encoder {encoder!r} is not one of {ENCODERS}")
    seq_len = vectorizer.get_config()["output_sequence_length"]
    ids = keras.Input((seq_len,), dtype="int64", name="token_ids")
    # The CNN sees padding as zero vectors (as in Kim 2014); pooling and the
    # RNNs skip it through the mask.
    embedding = keras.layers.Embedding(matrix.shape[0], matrix.shape[1],
                                       mask_zero=encoder != "cnn", name=EMBEDDING_LAYER)
    x = embedding(ids)
    # Assigned, not passed as a Constant initializer: that would copy the
    # whole matrix into the saved model's config.
    embedding.embeddings.assign(matrix)
    embedding.trainable = train_embeddings
    if embedding_dropout:
        # Drops whole words (all their dimensions): a sentence must be
        # classified from the rest of its words, which curbs memorizing
        # the few words of each training sentence.
        x = keras.layers.SpatialDropout1D(embedding_dropout, name="embedding_dropout")(x)
    x = _encoder(x, encoder, units)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    probs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                               name=HEAD_LAYER)(x)
    ids_model = keras.Model(ids, probs, name="tl_keras_text_ids")
    texts = keras.Input((), dtype="string", name="text")
    model = keras.Model(texts, ids_model(vectorizer(texts)), name=f"tl_keras_text_{encoder}")
    return TextClassifier(model, ids_model, vectorizer, embedding)


def predict_texts(model: keras.Model, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Probabilities [N, C] of the string model for `texts`, in order."""
    return np.asarray(model.predict(_batches(texts, batch_size), verbose=0), dtype=np.float32)
