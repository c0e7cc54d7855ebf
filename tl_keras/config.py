"""The one configuration object of tl_keras.

The CLI (`tl_keras.cli`) builds its absl flags from the fields below, so the
defaults live here and only here. The library takes a `Config` (or plain
arguments) and never reads flags.
"""

from __future__ import annotations

import dataclasses
import json

from tl_keras.errors import fail


# The validation share of --val_fraction=0 (auto) where a run needs a validation split.
DEFAULT_VAL_FRACTION = 0.2


@dataclasses.dataclass
class Config:
    """Everything a run needs. Field names are the CLI flag names.

    Defaults were chosen by measurement on real photos (see `flags/*.flags`
    and the README); each comment says what the field controls.
    """

    # --- data ---------------------------------------------------------------
    # Training data: a folder of class subfolders, a CSV/TSV list of PATH,LABEL rows (LABEL a|b:
    # multi-label) or `tfds:NAME[:SPLIT]`.
    data: str = ""
    # Validation data; empty: a seeded, stratified split of `data`.
    val_data: str = ""
    # Test data, evaluated once at the end; empty: none.
    test_data: str = ""
    # Fraction of `data` held out for validation when `val_data` is empty; 0: auto:
    # none where k-fold cross-validation on all images replaces it (image runs with
    # --head_fit=cv_logistic), 0.2 elsewhere (text, pretrain, --head_fit=adamw).
    val_fraction: float = 0.0
    # Fraction of `data` held out for testing when `test_data` is empty.
    test_fraction: float = 0.0
    # Split of a TFDS dataset used for training (TFDS split syntax).
    tfds_split: str = "train"
    # Where TFDS finds or stores its datasets; empty: its own default.
    tfds_data_dir: str = ""

    # --- outputs ------------------------------------------------------------
    output_dir: str = "runs/latest"

    # --- backbone -----------------------------------------------------------
    # Lower-case family name, e.g. mobilenet_v2, efficientnet_b0, resnet50.
    backbone: str = "mobilenet_v2"
    # Width multiplier for families that have one; 0: the family default.
    alpha: float = 0.0
    # imagenet | none | PATH to a weights file (loads offline, any size).
    weights: str = "imagenet"
    # Square input size in pixels; 0: the family's default size.
    image_size: int = 0

    # --- head ---------------------------------------------------------------
    # How stage 1 fits the head on the cached features: cv_logistic (a logistic
    # regression, its L2 strength chosen by k-fold cross-validation on all labelled
    # images, then fitted on all of them; without a validation split the same folds
    # decide whether stage 2 pays) or adamw (head_epochs of AdamW, early-stopped on the
    # validation split). cv_logistic: 0.7 to 3.8 points more accurate on few-shot
    # flowers128 draws nobody reports (benchmarks/README.md, issue 20).
    head_fit: str = "cv_logistic"
    # Folds of --head_fit=cv_logistic's cross-validation (fewer if a class has fewer images).
    cv_folds: int = 5
    dropout: float = 0.2
    label_smoothing: float = 0.1

    # --- training -----------------------------------------------------------
    batch_size: int = 32
    seed: int = 42
    # Stage 1: the head on frozen backbone features.
    head_epochs: int = 40
    head_learning_rate: float = 1e-3
    head_weight_decay: float = 1e-4
    # Stage 2: the top blocks of the backbone, BatchNorm kept frozen.
    # 6, not 10: on 7 splits (the shared flowers, seeds 1/2/3/42, and 3 disjoint
    # subsets of flowers128) 6 epochs averaged 0.781 test accuracy with 8 blocks,
    # 10 epochs 0.769 (benchmarks/README.md).
    finetune_epochs: int = 6
    # Blocks unfrozen from the top; 0: auto, the top 20% of the backbone's blocks
    # (4 of MobileNetV2's 18; see backbones.AUTO_FINETUNE_FRACTION).
    # --finetune_epochs=0 skips stage 2.
    finetune_blocks: int = 0
    finetune_learning_rate: float = 3e-4
    warmup_epochs: int = 1
    # Early stopping patience (epochs without val_loss improvement).
    patience: int = 8
    # Views of each training image cached for both stages (view 0 clean, the rest
    # augmented); an epoch still trains on one view of each image, so views add
    # augmentation, not epoch cost. 2, not 4: on the 7 splits of
    # benchmarks/defaults_study.py (6 stage-2 epochs, top 4 blocks) 2 views averaged
    # 0.772 test accuracy, 3 views 0.764, 4 views 0.774 (flowers 0.831 / 0.831 /
    # 0.834), at half the caching time of 4. Earlier, on the flowers alone, 8 views
    # did no better than 4 (mean 0.834 both) at twice the caching time.
    cache_views: int = 2
    # Augmentation strength; all 0 turns augmentation off.
    flip: bool = True
    rotation: float = 10.0  # degrees
    zoom: float = 0.1
    contrast: float = 0.1

    # --- speed: caches, precision, compilation ---------------------------------
    # Folder of cached features/activations, reused by reruns (also the pre-flight scan's
    # cache, converted images and spilled decoded images); empty: OUT/cache.
    cache_dir: str = ""
    # Cached arrays up to this size stay in RAM; larger ones are memory-mapped from disk.
    # Decoded training/validation images get the same RAM budget; beyond it, files on disk.
    cache_ram_mb: int = 2048
    # Stage 2 trains on cached activations when they need at most this much;
    # beyond it stage 2 runs through the full model.
    cache_max_mb: int = 8192
    # auto | float32 | mixed_float16 | mixed_bfloat16 (auto: bf16 on GPUs of compute
    # capability >= 8, fp16 with loss scaling on older GPUs, float32 on CPU).
    precision: str = "auto"
    # auto | true | false: XLA-compile training steps (auto: on GPUs); falls back
    # to plain TensorFlow, saying so, when an op cannot be compiled.
    jit_compile: str = "auto"
    # auto | tensorflow | litert: what runs the frozen passes that cache features and
    # activations. litert: the frozen model converted to TFLite once (cached like the
    # features) and run by XNNPACK on the CPU's cores; auto: litert on CPU-only machines
    # (default strategy, float32) when the images to pass make the conversion pay.
    frozen_engine: str = "auto"

    # --- distribution: tf.distribute strategies (issue 8, tl_keras/distribute.py) ---
    # auto | default | one_device | mirrored | multi_worker | tpu (auto: tpu when --tpu
    # names one, multi_worker when TF_CONFIG lists several workers, mirrored with more
    # than one GPU, default otherwise). See docs/distribute.md.
    strategy: str = "auto"
    # The TPU to run on: `local` on a Cloud TPU VM, or a TPU name / grpc:// address.
    tpu: str = ""
    # With N replicas: sqrt (global batch = batch_size x N, learning rates x sqrt(N)),
    # linear (batch x N, rates x N) or none (batch_size is the global batch, rates as given).
    replica_scaling: str = "sqrt"

    # --- evaluation / export -------------------------------------------------
    # Average the predictions of each image and its mirror (only with --flip,
    # whose augmentation says a mirror is a valid image).
    tta: bool = True
    # Calibrate the kept model's probabilities with a temperature fitted on the
    # validation predictions (report/calibration.py): the saved model, the
    # SavedModel and TFLite return calibrated probabilities; the argmax is unchanged.
    calibrate: bool = True
    # Selective prediction (single-label runs): the confidence threshold above which the
    # answers reach this accuracy, chosen on the validation predictions; report.json and
    # report.md show it with the accuracy-coverage curve on the test split, and the export
    # stores it in assets.extra/selective.json. 0: off.
    target_accuracy: float = 0.95
    # "None of the above" (single-label image runs): the share of held-out known images
    # that the threshold on the out-of-distribution score keeps (model/open_set.py); the
    # SavedModel and TFLite files return ood_score and unknown next to the probabilities,
    # predict prints "unknown", and the export stores the threshold in
    # assets.extra/open_set.json. 0: off.
    unknown_keep: float = 0.95
    top_k: int = 3
    export: bool = True

    # --- reports and TensorBoard (issue 6) -------------------------------------
    # Write TensorBoard logs of both stages to OUTPUT_DIR/tensorboard.
    tensorboard: bool = True

    # --- data: pre-flight scan, class balance, image cache, more augmentation (issue 3) ---
    # Images with more pixels than this are skipped by the pre-flight scan (decompression bombs).
    max_pixels: int = 100000000
    # Drop training (and validation) copies of a validation or test image: byte-identical
    # ones (pre-flight) and, when the audit runs, near-duplicates (resized, re-encoded,
    # cropped copies whose copy descriptors have cosine similarity >= audit_similarity).
    drop_leakage: bool = False
    # train: audit the data on the cached features (likely label errors, near-duplicates and
    # leakage, outliers): OUT/audit.md, label_issues.csv, relabelled.csv, a summary in
    # report.md (tl-keras audit runs it alone). On by default (issue 22): 2.5 s on 100
    # photos; its cost next to the caching pass (1.29x with a test split's own feature
    # pass, 1.1x without) is in benchmarks/README.md; --noaudit skips it.
    audit: bool = True
    # Audit: cosine similarity of centred copy descriptors (a grid of a middle block's
    # activations) from which two images are near-duplicates (chosen on flowers128 photos
    # not in the benchmark's flowers: benchmarks/README.md).
    audit_similarity: float = 0.72
    # auto: weight each class by n / (classes * n_class) in both stages (balanced); none: 1.
    class_weight: str = "auto"
    # Augmentation: maximum random shift, as a fraction of height and width; 0: off.
    translation: float = 0.0
    # Augmentation: random resized crop keeping at least this fraction of the area; 0: off.
    crop_min_area: float = 0.0

    # --- serving: export versions, TFLite, parity gate, predict ---------------
    # Replace the newest OUT/export/<version> instead of writing the next version.
    overwrite: bool = False
    # TFLite variants written next to the SavedModel, comma-separated:
    # float, dynamic, float16, int8; empty: none.
    tflite: str = ""
    # Training images in the int8 variant's representative (calibration) dataset.
    int8_calibration_images: int = 200
    # Validation images (texts for --task=text) the parity gate predicts with Keras,
    # the SavedModel and each TFLite variant; 0: all.
    parity_images: int = 100
    # Parity gate: minimum top-1 agreement with the Keras model per artifact
    # (NAME=VALUE,...; names left out keep these defaults).
    parity_min_agreement: str = "saved_model=1.0,float=0.98,float16=0.9,dynamic=0.85,int8=0.85"
    # Parity gate: maximum absolute probability difference from the Keras model
    # per artifact (NAME=VALUE,...; names left out keep these defaults).
    parity_max_prob_diff: str = "saved_model=1e-4,float=1e-3,float16=0.05,dynamic=0.3,int8=0.5"
    # predict: image files or folders, comma-separated.
    images: str = ""
    # predict: print JSON instead of a table.
    json: bool = False

    # --- text classification (--task=text; tl_keras/text.py) -----------------
    # What the run classifies: image | text.
    task: str = "image"
    # Pre-trained word vectors for --task=text: a GloVe or word2vec (text or binary)
    # file; empty: random vectors, trained from stage 1 on.
    embeddings: str = ""
    # Word-vector size; 0: the size of --embeddings, or 100 without them.
    embedding_dim: int = 0
    # Words of --embeddings that join the vocabulary besides the training words: the
    # first N records of the file (GloVe and word2vec files are sorted by frequency),
    # with their vectors, so words that no training text contains (but validation,
    # test or users' texts do) keep their meaning instead of becoming [UNK]; 0: the
    # training words only. The default 100000 covers nearly all the words of ordinary
    # English text and costs N x dim floats in the model (100k x 300d = 120 MB, x 50d =
    # 20 MB); the full GloVe 6B (400k words) adds mostly rare names and numbers.
    embedding_vocabulary: int = 100000
    # How the embedding rows start with --embeddings: pretrained (the file's vectors,
    # frozen in stage 1) or random (only the file's words, for the same vocabulary as
    # with pretrained; random vectors trained from stage 1 on, as without --embeddings:
    # the control arm of benchmarks/text_glove.py).
    embedding_init: str = "pretrained"
    # Vocabulary size: the most frequent training words, padding and [UNK] included.
    max_tokens: int = 20000
    # Tokens kept per text (longer texts are cut, shorter ones padded); 0: auto, the 99th
    # percentile of the training texts' token counts rounded up to a multiple of 8, in
    # [8, 512] (48 on rt-polarity, the recipe's value; tl_keras/text/model.py).
    sequence_length: int = 0
    # Encoder over the word vectors: pool (mean+max, then a ReLU layer), cnn (widths
    # 3, 4, 5, max over time), lstm or gru (bidirectional, mean+max over its states).
    encoder: str = "cnn"
    # Hidden units (pool), filters per width (cnn) or units per direction (lstm, gru).
    # 200, not flags/rt_polarity.flags' 100 (Kim's), with the text stage-2 rate 2e-3: chosen
    # for cnn on the rt-polarity validation split, seeds 1-3 (benchmarks/README.md); pool,
    # lstm and gru were not measured at either value.
    encoder_units: int = 200
    # Dropout of whole word vectors (the same words dropped in every dimension) before
    # the encoder, in training only; 0: off. 0.3: flags/rt_polarity.flags' value.
    embedding_dropout: float = 0.3

    # --- reliability: resume, determinism, untrusted inputs (issue 7) ----------
    # Discard the interrupted run in OUTPUT_DIR (its state.json and checkpoints/;
    # caches and data stay) and start over, instead of resuming it.
    restart: bool = False
    # Seconds of training between stage checkpoints (0: after every epoch). A
    # stage's last epoch is always saved; a kill loses at most this much training.
    checkpoint_seconds: float = 30.0
    # TensorFlow op determinism: with the same --seed, two runs on the same
    # machine give identical weights and metrics (slower, mostly on GPUs).
    deterministic: bool = False
    # Let list files (CSV/TSV) name images outside the list's own folder.
    allow_external_paths: bool = False

    # --- source models: tl-keras pretrain, train --backbone=PATH.keras (issue 10) ---
    # pretrain: architecture of the source model trained from scratch: compact_cnn
    # (fast on CPUs), alexnet, or a keras.applications family (weights=None).
    architecture: str = "compact_cnn"
    # pretrain: epochs of one learning-rate cycle (warmup_epochs of linear warmup, then cosine decay).
    pretrain_epochs: int = 6
    # pretrain: peak learning rate of AdamW.
    pretrain_learning_rate: float = 3e-3
    # pretrain: AdamW decoupled weight decay (not on biases and normalization).
    pretrain_weight_decay: float = 0.01
    # pretrain: batch size (large batches keep a CPU busy on abundant data).
    pretrain_batch_size: int = 64
    # --backbone=PATH.keras: the layer whose output becomes the features; empty: the
    # last pooling or flatten before the model's dense classifier.
    cut_layer: str = ""
    # --backbone=PATH.keras: comma-separated layer-name prefixes, one stage-2 block each;
    # empty: the model's block-map json, else blocks found in its layer graph.
    block_prefixes: str = ""
    # --backbone=PATH.keras: auto | tf | caffe | torch | none: the pixels the model expects;
    # auto: what the file says (a tl_keras Preprocess layer, its block-map json), else none (0..255).
    preprocess: str = "auto"

    @classmethod
    def for_text(cls, **fields) -> "Config":
        """A `--task=text` config: TEXT_DEFAULTS, then `fields` (which win over them).

        What library and notebook users call instead of `Config(task="text", ...)`,
        which keeps the image defaults of the shared fields.
        """
        return cls(**{"task": "text", **TEXT_DEFAULTS, **fields})

    def with_text_defaults(self, given=()) -> "Config":
        """With task text: TEXT_DEFAULTS for the fields not named in `given`; else self."""
        if self.task != "text":
            return self
        return self.replace(**{k: v for k, v in TEXT_DEFAULTS.items() if k not in given})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Builds a config from a dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


# The defaults of `--task=text` for the fields it shares with image runs (whose defaults
# above were measured on photos): flags/rt_polarity.flags' values, measured on the fixed
# rt-polarity split (benchmarks/text_glove.py; README "Text", benchmarks/README.md). The CLI
# applies them to the flags not given (`Config.with_text_defaults`); `Config.for_text` too.
TEXT_DEFAULTS = {
    # Kim (2014)'s CNN dropout; the text head sees 300 max-pooled filters.
    "dropout": 0.5,
    "batch_size": 64,
    # Stage 1 (frozen word vectors) prepares stage 2: 10 epochs reach validation 0.71-0.74.
    "head_epochs": 10,
    # Stage 2 fine-tunes the word vectors: the recipe's 20-epoch cosine at peak 1e-3 gave 0.784
    # against 0.768 for 10 epochs and 0.751 for 15 epochs at 3e-4 (GloVe 50d, seed 1). 2e-3
    # with --encoder_units=200: validation accuracy 0.778 against the recipe's 0.770 (mean of
    # seeds 1-3; early stopping then ends stage 2 after 7-8 epochs).
    "finetune_epochs": 20,
    "finetune_learning_rate": 2e-3,
    # Stage 2 overfits once the vectors move (training accuracy 0.90, validation 0.77); with
    # restore-best early stopping, patience 8 ended later with the weights 3 kept (seed 42).
    "patience": 3,
}


def fields_with_help() -> list[tuple[dataclasses.Field, str]]:
    """(field, help text) pairs, help taken from the comments above each field."""
    import inspect
    import re

    src = inspect.getsource(Config)
    helps: dict[str, str] = {}
    pending: list[str] = []
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("#") and not s.startswith("# ---"):
            pending.append(s.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+): [\w\[\]\.]+ = [^#]*(?:#\s*(.*))?$", s)
        if m:
            text = " ".join(pending)
            if m.group(2):
                text = (text + " " if text else "") + f"({m.group(2)})"
            helps[m.group(1)] = text or m.group(1)
            if m.group(1) in TEXT_DEFAULTS:
                helps[m.group(1)] += f" (text: {TEXT_DEFAULTS[m.group(1)]})"
        pending = []
    return [(f, helps.get(f.name, f.name)) for f in dataclasses.fields(Config)]


def validate(cfg: Config) -> None:
    """Checks values that need no data, model or export code; raises ConfigError.

    Backbone-dependent checks (known family, minimum size, number of blocks)
    live in `tl_keras.model.families.validate`, the serving settings' in
    `tl_keras.export.checks.validate`; `tl_keras.run.setup.validate` runs both.
    """
    if not cfg.data:
        raise fail("data", cfg.data, "required: a folder of class subfolders, a CSV/TSV list "
                   "or tfds:NAME")
    for name in ("head_learning_rate", "finetune_learning_rate"):
        v = getattr(cfg, name)
        if not v > 0:
            raise fail(name, v, "must be > 0")
    if not 0 <= cfg.target_accuracy <= 1:
        raise fail("target_accuracy", cfg.target_accuracy, "must be in [0, 1] (0: off)")
    if not 0 <= cfg.unknown_keep <= 1:
        raise fail("unknown_keep", cfg.unknown_keep, "must be in [0, 1] (0: off)")
    if not 0 < cfg.audit_similarity <= 1:
        raise fail("audit_similarity", cfg.audit_similarity, "must be in (0, 1]")
    for name in ("batch_size", "cache_views", "top_k"):
        v = getattr(cfg, name)
        if int(v) < 1:
            raise fail(name, v, "must be >= 1")
    for name in ("head_epochs", "finetune_epochs", "finetune_blocks", "patience",
                 "warmup_epochs"):
        v = getattr(cfg, name)
        if int(v) < 0:
            raise fail(name, v, "must be >= 0")
    if not 0 <= cfg.test_fraction < 1:
        raise fail("test_fraction", cfg.test_fraction, "must be in [0, 1)")
    if cfg.test_fraction and cfg.test_data:
        raise fail("test_fraction", cfg.test_fraction, "conflicts with --test_data; give one")
    if not 0 <= cfg.val_fraction < 1 and not cfg.val_data:
        raise fail("val_fraction", cfg.val_fraction, "must be in [0, 1) (0: auto)")
    if cfg.head_fit not in ("cv_logistic", "adamw"):
        raise fail("head_fit", cfg.head_fit, "choose cv_logistic or adamw")
    if cfg.cv_folds < 2:
        raise fail("cv_folds", cfg.cv_folds, "must be >= 2")
    if not 0 <= cfg.dropout < 1:
        raise fail("dropout", cfg.dropout, "must be in [0, 1)")
    if not 0 <= cfg.label_smoothing < 1:
        raise fail("label_smoothing", cfg.label_smoothing, "must be in [0, 1)")
    if cfg.head_weight_decay < 0:
        raise fail("head_weight_decay", cfg.head_weight_decay, "must be >= 0")
    if cfg.alpha < 0:
        raise fail("alpha", cfg.alpha, "must be > 0 (or 0 for the family default)")
    if cfg.image_size < 0:
        raise fail("image_size", cfg.image_size, "must be > 0 (or 0 for the family default)")
    if not 0 <= cfg.rotation <= 180:
        raise fail("rotation", cfg.rotation, "degrees, must be in [0, 180]")
    for name in ("zoom", "contrast"):
        v = getattr(cfg, name)
        if not 0 <= v < 1:
            raise fail(name, v, "must be in [0, 1)")
    if cfg.precision not in ("auto", "float32", "mixed_float16", "mixed_bfloat16"):
        raise fail("precision", cfg.precision,
                   "choose one of auto, float32, mixed_float16, mixed_bfloat16")
    if cfg.jit_compile.lower() not in ("auto", "true", "false"):
        raise fail("jit_compile", cfg.jit_compile, "choose one of auto, true, false")
    if cfg.frozen_engine not in ("auto", "tensorflow", "litert"):
        raise fail("frozen_engine", cfg.frozen_engine, "choose one of auto, tensorflow, litert")
    for name in ("cache_ram_mb", "cache_max_mb", "checkpoint_seconds"):
        if getattr(cfg, name) < 0:
            raise fail(name, getattr(cfg, name), "must be >= 0")
    if not cfg.output_dir:
        raise fail("output_dir", cfg.output_dir, "required")
    # --- data: pre-flight scan, class balance, image cache (issue 3) ---
    if cfg.max_pixels < 1:
        raise fail("max_pixels", cfg.max_pixels, "must be >= 1")
    if cfg.class_weight not in ("auto", "none"):
        raise fail("class_weight", cfg.class_weight, "expected auto or none")
    if not 0 <= cfg.translation < 1:
        raise fail("translation", cfg.translation, "must be in [0, 1)")
    if not 0 <= cfg.crop_min_area < 1:
        raise fail("crop_min_area", cfg.crop_min_area, "must be in [0, 1) (0: off)")

    # Text classification; its other checks are in text_pipeline.validate_text.
    if cfg.task not in ("image", "text"):
        raise fail("task", cfg.task, "must be image or text")
    # --- reliability (issue 7) ---
    if not 0 <= cfg.seed < 2 ** 32:
        raise fail("seed", cfg.seed, "must be in [0, 2**32)")
    if cfg.head_epochs < 1:  # the new head starts random: stage 2 would fine-tune noise
        raise fail("head_epochs", cfg.head_epochs, "must be >= 1 (stage 1 trains the new head)")

    # --- source models (issue 10) ---
    if cfg.preprocess not in ("auto", "tf", "caffe", "torch", "none"):
        raise fail("preprocess", cfg.preprocess, "choose one of auto, tf, caffe, torch, none")
    if not cfg.backbone.strip().lower().endswith(".keras"):
        for name, default in (("cut_layer", ""), ("block_prefixes", ""), ("preprocess", "auto")):
            if getattr(cfg, name) != default:
                raise fail(name, getattr(cfg, name), "only applies to --backbone=PATH.keras "
                           f"(got --backbone={cfg.backbone!r})")
