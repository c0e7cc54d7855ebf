"""Stage 2 on cached activations is the same computation as through the full model."""

from __future__ import annotations

import keras
import numpy as np
from conftest import WEIGHTS_MNV2_035

from tl_keras.model import blocks as blocks_lib
from tl_keras.model import classifier as model_lib
from tl_keras.model import families as families_lib
from tl_keras.train import activations


def _clf(seed=0):
    keras.utils.set_random_seed(seed)
    fam = families_lib.get_family("mobilenet_v2")
    bb = families_lib.build_backbone(fam, str(WEIGHTS_MNV2_035), 64, 0.35)
    return model_lib.build_classifier(bb, fam, 3, dropout=0.0)


def test_one_step_on_cached_activations_equals_one_step_through_full_model():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 8), 3)

    full, cached = _clf(), _clf()
    for a, b in zip(full.model.weights, cached.model.weights):
        b.assign(a.numpy())
    for clf in (full, cached):
        blocks_lib.set_trainable_top_blocks(clf.backbone, clf.family, 3)

    full.model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    full.model.train_on_batch(x, y)

    cut = activations.cut(cached, 3)
    assert cut is not None
    acts = cut.bottom.predict(x, verbose=0)
    assert acts.shape[1:] == cut.shape
    cut.trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    cut.trainer.train_on_batch(acts, y)

    changed = 0
    for a, b in zip(full.model.weights, cached.model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)
    before = _clf()
    for a, b in zip(full.model.weights, before.model.weights):
        changed += not np.allclose(a.numpy(), b.numpy())
    assert changed >= 4, "the step changed nothing: the comparison would prove nothing"


def test_trainer_shares_weights_with_full_model():
    clf = _clf()
    blocks_lib.set_trainable_top_blocks(clf.backbone, clf.family, 2)
    cut = activations.cut(clf, 2)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(cut.trainer.predict(cut.bottom.predict(x, verbose=0), verbose=0),
                               clf.model.predict(x, verbose=0), rtol=1e-4, atol=1e-6)
    trainable = {w.path for w in cut.trainer.trainable_weights}
    assert trainable == {w.path for w in clf.model.trainable_weights}


def test_no_cut_when_every_block_is_unfrozen():
    clf = _clf()
    n = blocks_lib.num_blocks(clf.backbone, clf.family)
    assert activations.cut(clf, n) is None
    assert activations.cut(clf, n - 1) is not None


def test_no_cut_says_why_and_stage_2_logs_that_reason(monkeypatch, capsys):
    import types

    from tl_keras.config import Config
    from tl_keras.run import views

    clf = _clf()
    n = blocks_lib.num_blocks(clf.backbone, clf.family)
    cut, why = activations.find_cut(clf, n)
    assert cut is None
    assert why == f"the top {n} blocks are all {n} of the backbone: nothing frozen below them to cache"
    # A split Keras refuses (here made to refuse): its own error is the reason,
    # and stage 2 says so before training through the full model, instead of
    # blaming the block boundary.
    refusal = "Graph disconnected: cannot find the input of layer 'block_16_expand'"

    def model(*args, name=None, **kwargs):
        if name == "backbone_top":
            raise ValueError(refusal)
        return keras.Model(*args, name=name, **kwargs)

    monkeypatch.setattr(activations, "keras", types.SimpleNamespace(Model=model,
                                                                     Input=keras.Input))
    cfg = Config(data="d", finetune_epochs=1, finetune_blocks=2)
    assert views.plan_cut(cfg, 2, clf, data=None) is None
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == ("[tl_keras] stage 2: no cached activations (Keras could not split the "
                    f"backbone below the top 2 blocks: ValueError: {refusal}); it will train "
                    "through the full model")
    monkeypatch.undo()
    assert activations.find_cut(clf, 2)[0] is not None  # the same split, not refused


def test_cached_test_outputs_evaluate_the_kept_model_as_the_served_model(tmp_path):
    # A run whose kept model left the part below the cut frozen evaluates it
    # on the test images' cached outputs and their mirrors' (no new pass): the
    # head on pooled features, or a fine-tuned top on the activations. Both
    # must be what the mirror-averaging inference model gives on the images.
    from conftest import FLOWERS_MINI

    from tl_keras.config import Config
    from tl_keras.core import cache as cache_lib
    from tl_keras.data import sources as sources_lib
    from tl_keras.report import metrics as metrics_lib
    from tl_keras.run import views

    paths = [str(p) for p in sorted(FLOWERS_MINI.rglob("*.jpg"))[::17]]
    split = sources_lib.Split(paths, np.arange(len(paths)) % 3, "test")
    clf = _clf()
    blocks_lib.set_trainable_top_blocks(clf.backbone, clf.family, 2)
    cut = activations.cut(clf, 2)
    arrays = views.test_features(Config(batch_size=4), clf, split, 64,
                                 cache_lib.ArrayCache(str(tmp_path)), {"run": "t"}, cut,
                                 mirror=True)
    assert {"f", "m", "a", "am", "y"} <= set(arrays)
    served = clf.inference_model(mirror_average=True)
    head = views.cached_probabilities(clf.head, arrays, "f", mirror=True)
    np.testing.assert_allclose(head, metrics_lib.predict(served, split, 64), atol=2e-5)
    # "Fine-tune" the top: every trainable weight moves.
    rng = np.random.default_rng(4)
    for w in clf.model.trainable_weights:
        w.assign(w.numpy() + rng.normal(0, 0.05, w.shape).astype(w.dtype))
    want = metrics_lib.predict(served, split, 64)
    assert np.abs(want - head).max() > 1e-2  # the top changed: the check can fail
    top = views.cached_probabilities(cut.trainer, arrays, "a", mirror=True)
    np.testing.assert_allclose(top, want, atol=2e-5)
