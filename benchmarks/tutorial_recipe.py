"""The TensorFlow transfer-learning tutorial's recipe, as a plain script would run it.

Used by vs_recipe.py in its own process (imports only TensorFlow and Keras,
like a user's script) or called in-process.

Usage: python benchmarks/tutorial_recipe.py SPLIT_DIR WEIGHTS_FILE
  SPLIT_DIR holds train/, val/ and test/ with one folder per class; prints
  {"stage1", "stage2", "total", "test_accuracy"} as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

SIZE, ALPHA, SEED, BATCH = 160, 0.35, 42, 32


def recipe(dirs: dict, weights: str, n_cls: int) -> dict:
    """The TensorFlow tutorial's transfer-learning recipe, adapted to n classes.

    Its total runs from listing the files to the test accuracy (datasets,
    model, both fits, evaluation), like tl_keras's, which also writes its
    reports and model file inside its total.
    """
    t_start = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    kw = dict(batch_size=BATCH, image_size=(SIZE, SIZE), seed=SEED, label_mode="int")
    train_ds = keras.utils.image_dataset_from_directory(dirs["train"], shuffle=True, **kw)
    val_ds = keras.utils.image_dataset_from_directory(dirs["val"], shuffle=False, **kw)
    test_ds = keras.utils.image_dataset_from_directory(dirs["test"], shuffle=False, **kw)
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE)
    val_ds = val_ds.prefetch(tf.data.AUTOTUNE)
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                     keras.layers.RandomRotation(0.2)])
    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False,
                                          weights=weights, alpha=ALPHA)
    base.trainable = False
    inputs = keras.Input((SIZE, SIZE, 3))
    x = augmentation(inputs)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1)(x)  # mobilenet_v2.preprocess_input
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(n_cls, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(train_ds, epochs=10, validation_data=val_ds, verbose=0)
    t1 = time.perf_counter() - t0
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.RMSprop(1e-5),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(train_ds, epochs=20, initial_epoch=10, validation_data=val_ds, verbose=0)
    t2 = time.perf_counter() - t0
    _, acc = model.evaluate(test_ds, verbose=0)
    return {"stage1": t1, "stage2": t2, "total": time.perf_counter() - t_start,
            "test_accuracy": float(acc)}


if __name__ == "__main__":
    split_dir, weights = sys.argv[1], sys.argv[2]
    dirs = {k: os.path.join(split_dir, k) for k in ("train", "val", "test")}
    print(json.dumps(recipe(dirs, weights, len(os.listdir(dirs["train"])))))
