"""Text classification with pre-trained word vectors (`--task=text`).

Word-vector loaders on real-format files cut from the shared GloVe vectors,
coverage numbers, what each stage may change, the raw-string model, its
safe-mode reload, the SavedModel, and a real CLI run on rt-polarity.
"""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import DATA, run_cli
from tl_keras import runs
from tl_keras import text as text_lib
from tl_keras import train as train_lib
from tl_keras.config import ConfigError

TEXT = DATA / "text"
GLOVE = TEXT / "glove.6B.50d.rt-polarity.txt"


def _glove_lines(n: int, extra_words=()) -> list[str]:
    """The first n lines of the shared GloVe file, plus the lines of `extra_words`."""
    lines, wanted = [], set(extra_words)
    with open(GLOVE, encoding="utf-8") as f:
        for i, line in enumerate(f):
            word = line.split(" ", 1)[0]
            if i < n or word in wanted:
                lines.append(line.rstrip("\n"))
                wanted.discard(word)
            if i >= n and not wanted:
                break
    return lines


def _parsed(lines: list[str]) -> dict[str, np.ndarray]:
    return {l.split(" ")[0]: np.asarray(l.split(" ")[1:], dtype=np.float32) for l in lines}


def _rt_polarity(n_per_class: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded sample of rt-polarity sentences with their labels ("neg"/"pos")."""
    texts, labels = [], []
    rng = np.random.default_rng(seed)
    for label in ("neg", "pos"):
        with open(TEXT / f"rt-polarity.{label}", encoding="utf-8") as f:
            lines = [l.strip() for l in f if l.strip()]
        for i in rng.permutation(len(lines))[:n_per_class]:
            texts.append(lines[i])
            labels.append(label)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [labels[i] for i in order]


def _write_tsv(path, texts, labels):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return path


# --------------------------------------------------------------------------
# Word vectors: GloVe text, word2vec text, word2vec binary
# --------------------------------------------------------------------------

# 300 real GloVe lines, including non-ASCII words ("–", "—", "josé").
LINES = _glove_lines(300, extra_words=("josé", "—"))


def test_glove_text_format(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    wv = text_lib.load_vectors(str(path))
    assert (wv.format, wv.dim, len(wv), wv.rows_skipped) == ("glove", 50, len(LINES), 0)
    for word, vec in _parsed(LINES).items():
        np.testing.assert_array_equal(wv.vectors[wv.index[word]], vec)


def test_word2vec_text_format(tmp_path):
    path = tmp_path / "vectors.w2v.txt"
    path.write_text(f"{len(LINES)} 50\n" + "\n".join(LINES) + "\n", encoding="utf-8")
    wv = text_lib.load_vectors(str(path))
    assert (wv.format, wv.dim, len(wv)) == ("word2vec_text", 50, len(LINES))
    assert "50" not in wv.index and str(len(LINES)) not in wv.index  # the header is no word
    for word, vec in _parsed(LINES).items():
        np.testing.assert_array_equal(wv.vectors[wv.index[word]], vec)


def test_word2vec_binary_format(tmp_path):
    # The format of word2vec's -binary 1 output (and gensim's save_word2vec_format(binary=True)):
    # "COUNT DIM\n", then per word: UTF-8 word, a space, DIM little-endian float32, "\n".
    want = _parsed(LINES)
    path = tmp_path / "vectors.bin"
    with open(path, "wb") as f:
        f.write(f"{len(want)} 50\n".encode())
        for word, vec in want.items():
            f.write(word.encode("utf-8") + b" " + vec.astype("<f4").tobytes() + b"\n")
    assert text_lib.detect_vectors_format(str(path)) == "word2vec_binary"
    wv = text_lib.load_vectors(str(path))
    assert (wv.format, wv.dim, len(wv), wv.rows_read) == ("word2vec_binary", 50, len(want),
                                                          len(want))
    for word, vec in want.items():
        np.testing.assert_array_equal(wv.vectors[wv.index[word]], vec)
    # The same vectors whatever the format.
    glove = tmp_path / "vectors.txt"
    glove.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    wg = text_lib.load_vectors(str(glove))
    for word in want:
        np.testing.assert_array_equal(wv.vectors[wv.index[word]], wg.vectors[wg.index[word]])


def test_only_wanted_words_are_kept_and_other_cases_fall_back(tmp_path):
    word, numbers = LINES[0].split(" ", 1)
    other_numbers = LINES[3].split(" ", 1)[1]
    assert word == "the"
    lines = [f"The {other_numbers}",    # a cased "The" before the exact "the": exact wins
             LINES[0],
             f"MOVIE {numbers}"]         # only a cased form of "movie": it is taken
    path = tmp_path / "cased.txt"
    path.write_text("\n".join(lines + LINES[5:20]) + "\n", encoding="utf-8")
    wv = text_lib.load_vectors(str(path), wanted={"the", "movie", "zzzq"})
    assert sorted(wv.index) == ["movie", "the"]
    np.testing.assert_array_equal(wv.vectors[wv.index["the"]], _parsed([LINES[0]])["the"])
    np.testing.assert_array_equal(wv.vectors[wv.index["movie"]], _parsed([LINES[0]])["the"])


def test_malformed_records_are_reported_and_skipped(tmp_path, capsys):
    bad = [LINES[0], "short 0.1 0.2", "weird " + " ".join(["nan"] * 50), LINES[2]]
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(bad) + "\n", encoding="utf-8")
    wv = text_lib.load_vectors(str(path))
    assert sorted(wv.index) == sorted([LINES[0].split()[0], LINES[2].split()[0]])
    assert wv.rows_skipped == 2
    err = capsys.readouterr().err
    assert "skipped 2 malformed" in err and "line 2" in err


def test_vectors_file_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--embeddings=.*no such file"):
        text_lib.load_vectors(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="holds no word vectors"):
        text_lib.load_vectors(str(empty))


# --------------------------------------------------------------------------
# Vocabulary, coverage, standardization
# --------------------------------------------------------------------------

def test_coverage_counts_words_and_tokens(tmp_path):
    known = ["the", "movie", "is", "great", "!", "film"]
    path = tmp_path / "v.txt"
    path.write_text("\n".join(_glove_lines(0, known)) + "\n", encoding="utf-8")
    texts = ["The movie is great!", "the film is awful", "zzyzx qwertq the"]
    vectorizer = text_lib.build_vectorizer(texts, max_tokens=100, sequence_length=8)
    vocab = vectorizer.get_vocabulary()
    # 9 words: the is movie great ! film awful zzyzx qwertq (+ padding and [UNK]).
    assert len(vocab) == 11
    ids = text_lib.vectorize(vectorizer, texts)
    wv = text_lib.load_vectors(str(path), set(vocab[2:]))
    matrix, cov = text_lib.embedding_matrix(vocab, wv, 50, seed=0, train_ids=ids)
    # 6 of the 9 words have vectors; 9 of the 12 tokens ("the" x3, movie, is x2, great, !, film).
    assert cov == {"words": 9, "found": 6, "word_coverage": round(6 / 9, 4),
                   "token_coverage": 0.75}
    for word in known:
        np.testing.assert_array_equal(matrix[vocab.index(word)], wv.vectors[wv.index[word]])
    assert not matrix[:2].any()  # padding and [UNK]
    others = matrix[[vocab.index(w) for w in ("awful", "zzyzx", "qwertq")]]
    assert np.all(np.abs(others).sum(1) > 0)
    # Random rows are on the scale of the real vectors.
    assert 0.5 < others.std() / wv.vectors.std() < 2.0


def test_standardize_splits_punctuation_and_keeps_words_whole():
    vectorizer = text_lib.build_vectorizer(["x"], max_tokens=10, sequence_length=4)
    out = text_lib.standardize_text(tf.constant(["Great, FUN!", "don't well-made"])).numpy()
    assert out[0].decode().split() == ["great", ",", "fun", "!"]
    assert out[1].decode().split() == ["don't", "well-made"]
    assert vectorizer(tf.constant(["x x x x x x"])).shape == (1, 4)


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------

def test_csv_and_tsv_sources(tmp_path, capsys):
    p = tmp_path / "d.csv"
    p.write_text('id,label,text\n1,pos,"good, really good"\n2,neg,bad\n3,,no label\n'
                 '4,neg,"multi\nline"\n', encoding="utf-8")
    classes, split = text_lib.load_text_source(str(p), "data")
    assert classes == ["neg", "pos"]
    assert split.items == ["good, really good", "bad", "multi\nline"]
    assert split.labels.tolist() == [1, 0, 0]
    assert "skipped 1 row" in capsys.readouterr().err
    t = _write_tsv(tmp_path / "v.tsv", ["fine", "awful"], ["pos", "neg"])
    _, val = text_lib.load_text_source(str(t), "val_data", classes)
    assert val.labels.tolist() == [1, 0]
    _write_tsv(tmp_path / "u.tsv", ["meh"], ["neutral"])
    with pytest.raises(ConfigError, match=r"--val_data=.*'neutral' does not occur"):
        text_lib.load_text_source(str(tmp_path / "u.tsv"), "val_data", classes)
    (tmp_path / "h.csv").write_text("sentence,sentiment\na,b\n")
    with pytest.raises(ConfigError, match=r"--data=.*'text' and a 'label' column"):
        text_lib.load_text_source(str(tmp_path / "h.csv"), "data")


def test_folder_of_txt_files_source(tmp_path, capsys):
    for label, docs in {"neg": ["dull.", "boring"], "pos": ["a joy"]}.items():
        (tmp_path / label).mkdir()
        for i, d in enumerate(docs):
            (tmp_path / label / f"{i}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "pos" / "broken.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (tmp_path / "pos" / "notes.md").write_text("ignored")
    classes, split = text_lib.load_text_source(str(tmp_path), "data")
    assert classes == ["neg", "pos"]
    assert sorted(zip(split.items, split.labels.tolist())) == [("a joy", 1), ("boring", 0),
                                                               ("dull.", 0)]
    assert "broken.txt" in capsys.readouterr().err


def test_unknown_tfds_dataset_is_a_flag_error():
    with pytest.raises(ConfigError, match=r"--data='tfds:no_such_corpus_xyz'"):
        text_lib.load_text_source("tfds:no_such_corpus_xyz", "data")


# --------------------------------------------------------------------------
# The two stages: what each may change
# --------------------------------------------------------------------------

def test_stage1_leaves_embeddings_untouched_and_stage2_changes_them():
    keras.utils.set_random_seed(0)
    texts, labels = _rt_polarity(150)
    y = np.eye(2, dtype=np.float32)[[int(l == "pos") for l in labels]]
    vectorizer = text_lib.build_vectorizer(texts, 5000, 32)
    vocab = vectorizer.get_vocabulary()
    ids = text_lib.vectorize(vectorizer, texts)
    wv = text_lib.load_vectors(str(GLOVE), set(vocab[2:]))
    matrix, _ = text_lib.embedding_matrix(vocab, wv, 50, 0, ids)
    clf = text_lib.build_text_classifier(vectorizer, matrix, 2, "cnn", 16, 0.5)
    conv0 = clf.ids_model.get_layer("encoder_conv_3").kernel.numpy()
    train_lib.fit_head(clf.ids_model, ids[:250], y[:250], ids[250:], y[250:], epochs=2,
                       learning_rate=1e-3, weight_decay=1e-4, batch_size=32, patience=0,
                       label_smoothing=0.1, verbose=0)
    np.testing.assert_array_equal(clf.embedding.embeddings.numpy(), matrix)
    assert not np.allclose(clf.ids_model.get_layer("encoder_conv_3").kernel.numpy(), conv0)

    clf.embedding.trainable = True
    ds = tf.data.Dataset.from_tensor_slices((ids[:250], y[:250])).batch(32)
    val = tf.data.Dataset.from_tensor_slices((ids[250:], y[250:])).batch(32)
    train_lib.fit_finetune(clf.ids_model, ds, val, epochs=1, initial_epoch=2, steps_per_epoch=8,
                           learning_rate=1e-3, warmup_epochs=0, patience=0,
                           label_smoothing=0.1, verbose=0)
    after = clf.embedding.embeddings.numpy()
    seen = np.unique(ids[:250][ids[:250] > 1])
    assert np.abs(after[seen] - matrix[seen]).max() > 1e-4
    # Words no training text contains get no gradient (Adam without weight decay).
    unseen = np.setdiff1d(np.arange(2, len(vocab)), np.unique(ids[:250]))
    np.testing.assert_array_equal(after[unseen], matrix[unseen])


@pytest.mark.parametrize("encoder", ["pool", "cnn", "lstm", "gru"])
def test_every_encoder_takes_raw_strings(encoder):
    texts = ["A fine, warm film!", "dull and far too long", ""]
    vectorizer = text_lib.build_vectorizer(texts, 50, 6)
    matrix, _ = text_lib.embedding_matrix(vectorizer.get_vocabulary(), None, 8, 0)
    clf = text_lib.build_text_classifier(vectorizer, matrix, 3, encoder, 4, 0.5)
    probs = clf.model(tf.constant(["Never seen words here.", "a FINE film", ""])).numpy()
    assert probs.shape == (3, 3) and np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, text_lib.predict_texts(clf.model, ["Never seen words here.",
                                                                         "a FINE film", ""]),
                               atol=1e-6)


# --------------------------------------------------------------------------
# A real CLI run on a slice of rt-polarity with the GloVe vectors
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_run(tmp_path_factory, data_dir):
    """tl-keras train --task=text on 2000 rt-polarity sentences (test 400), GloVe 50d."""
    root = tmp_path_factory.mktemp("text_run")
    texts, labels = _rt_polarity(1350, seed=1)
    _write_tsv(root / "train.tsv", texts[:2000], labels[:2000])
    _write_tsv(root / "val.tsv", texts[2000:2300], labels[2000:2300])
    _write_tsv(root / "test.tsv", texts[2300:2700], labels[2300:2700])
    out = root / "out"
    proc = run_cli("train", "--task=text", f"--data={root / 'train.tsv'}",
                   f"--val_data={root / 'val.tsv'}", f"--test_data={root / 'test.tsv'}",
                   f"--embeddings={GLOVE}", "--encoder=cnn", "--encoder_units=64",
                   "--sequence_length=48", "--head_epochs=8", "--finetune_epochs=2",
                   "--patience=3", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return root, out, proc.stdout


def test_cli_text_run_writes_the_contract_and_beats_chance(text_run):
    root, out, stdout = text_run
    for f in ("model.keras", "labels.txt", "config.json", "report.json",
              "export/1/saved_model.pb", "export/1/assets/labels.txt"):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["neg", "pos"] == (out / "labels.txt").read_text().split()
    emb = report["embeddings"]
    assert emb["source"] == str(GLOVE) and emb["format"] == "glove" and emb["dim"] == 50
    # The shared file holds every corpus word GloVe knows (84% of the corpus vocabulary).
    assert 0.75 < emb["word_coverage"] < 1.0 and emb["token_coverage"] > 0.9
    assert f"token coverage {emb['token_coverage']:.1%}" in stdout
    assert report["stage1"]["epochs"] >= 1 and report["stage2"]["epochs"] >= 1
    assert report["kept"] in ("stage1", "stage2")
    # 2 balanced classes, 400 test sentences: chance is 0.5 (sd 0.025).
    assert report["test"]["n"] == 400
    assert report["test"]["accuracy"] >= 0.6, report["test"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "text" and cfg["embedding_dim"] == 50


def test_model_keras_reloads_in_safe_mode_with_the_same_predictions(text_run):
    root, out, _ = text_run
    # load_run loads in safe mode; evaluating the reloaded model on the raw test
    # file reproduces the numbers the training run wrote.
    result = runs.evaluate_run(str(out), str(root / "test.tsv"))
    report = json.loads((out / "report.json").read_text())
    assert result["test"] == report["test"]
    model, classes, _ = runs.load_run(str(out))
    probs = model(tf.constant(["A gorgeous, moving film.", "Dull, lifeless and far too long."]))
    assert probs.shape == (2, 2)


def test_embeddings_of_the_kept_stage(text_run):
    _, out, _ = text_run
    model, _, _ = runs.load_run(str(out))
    vocab = model.get_layer(text_lib.VECTORIZER_LAYER).get_vocabulary()
    ids_model = next(l for l in model.layers if isinstance(l, keras.Model))
    emb = ids_model.get_layer(text_lib.EMBEDDING_LAYER).embeddings.numpy()
    wv = text_lib.load_vectors(str(GLOVE), set(vocab[2:]))
    found = [i for i, w in enumerate(vocab) if w in wv.index]
    glove_rows = wv.vectors[[wv.index[vocab[i]] for i in found]]
    kept = json.loads((out / "report.json").read_text())["kept"]
    if kept == "stage1":  # frozen: exactly the GloVe vectors
        np.testing.assert_array_equal(emb[found], glove_rows)
    else:  # fine-tuned: moved, but still close to GloVe
        diff = np.abs(emb[found] - glove_rows).max(1)
        assert diff.max() > 1e-4 and np.median(diff) < 0.1


def test_saved_model_serving_default_on_strings_matches_keras(text_run):
    root, out, _ = text_run
    model, classes, _ = runs.load_run(str(out))
    texts = ["An utterly charming, funny film!", "a mess .", "", "zzyzx qwertq"]
    loaded = tf.saved_model.load(str(out / "export" / "1"))
    got = loaded.signatures["serving_default"](text=tf.constant(texts))
    want = text_lib.predict_texts(model, texts)
    np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)
    top1 = [c.decode() for c in got["classes"].numpy()[:, 0]]
    assert top1 == [classes[i] for i in want.argmax(1)]
    np.testing.assert_allclose(got["scores"].numpy()[:, 0], want.max(1), atol=1e-5)


@pytest.mark.parametrize("args,needles", [
    (["--encoder=transformer"], ["--encoder", "transformer", "pool, cnn, lstm, gru"]),
    (["--embeddings=/no/such/vectors.txt"], ["--embeddings", "/no/such/vectors.txt"]),
    (["--task=audio"], ["--task", "audio"]),
])
def test_bad_text_flags_give_one_line_errors(args, needles, tmp_path):
    t = _write_tsv(tmp_path / "t.tsv", ["good", "bad"], ["pos", "neg"])
    proc = run_cli("train", "--task=text", f"--data={t}", f"--output_dir={tmp_path / 'o'}",
                   *args, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tl-keras: error:"), last
    for n in needles:
        assert n in last, (n, last)
