"""The text classifier: vocabulary, embedding from word vectors, encoder, head.

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

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tl_keras.data import pipeline as data_pipeline

ENCODERS = ("pool", "cnn", "lstm", "gru")
CNN_WIDTHS = (3, 4, 5)
# Longest sequence whose RNN is unrolled (see _encoder).
UNROLL_MAX_LENGTH = 64
EMBEDDING_LAYER = "embedding"
VECTORIZER_LAYER = "vectorizer"
HEAD_LAYER = "head"


# --------------------------------------------------------------------------
# Vocabulary and the embedding matrix
# --------------------------------------------------------------------------

# Punctuation becomes tokens of its own ("great!" -> "great !"), as in the
# tokenization GloVe and word2vec were trained on. Apostrophes and hyphens
# stay inside words ("don't", "well-made").
PUNCTUATION = r'([!"#$%&()*+,./:;<=>?@\[\\\]^_`{|}~])'


@keras.saving.register_keras_serializable(package="tl_keras")
def standardize_text(texts):
    """Lower-cases and splits punctuation off words (the vectorizer's standardize)."""
    texts = tf.strings.lower(texts)
    return tf.strings.regex_replace(texts, PUNCTUATION, r" \1 ")


# --sequence_length=0 (auto): this percentile of the training texts' token counts, rounded
# up to a multiple of AUTO_LENGTH_MULTIPLE, within [AUTO_LENGTH_MIN, AUTO_LENGTH_MAX].
AUTO_LENGTH_PERCENTILE = 99
AUTO_LENGTH_MULTIPLE = 8
AUTO_LENGTH_MIN = 8
AUTO_LENGTH_MAX = 512


def auto_sequence_length(texts: list[str]) -> tuple[int, int]:
    """The tokens kept per text when --sequence_length=0, from the training texts.

    Long enough for all but the longest 1% of texts, so padding, not cutting, is the
    rule; capped so that a few huge documents cannot make every batch huge.

    Returns:
        (sequence length, the percentile's token count before rounding).
    """
    tokens = tf.strings.split(standardize_text(tf.constant(list(texts)))).row_lengths().numpy()
    p = int(np.ceil(np.percentile(tokens, AUTO_LENGTH_PERCENTILE))) if len(tokens) else 0
    rounded = -(-p // AUTO_LENGTH_MULTIPLE) * AUTO_LENGTH_MULTIPLE
    return int(min(max(rounded, AUTO_LENGTH_MIN), AUTO_LENGTH_MAX)), p


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
    return data_pipeline.steady(tf.data.Dataset.from_tensor_slices(list(texts)).batch(batch_size))


def vectorize(vectorizer: keras.layers.TextVectorization, texts: list[str],
              batch_size: int = 1024) -> np.ndarray:
    """Token ids int64 [N, sequence_length] of `texts`."""
    parts = [vectorizer(b).numpy() for b in _batches(texts, batch_size)]
    if not parts:
        return np.zeros((0, vectorizer.get_config()["output_sequence_length"] or 0), np.int64)
    return np.concatenate(parts).astype(np.int64)


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
