"""The downstream benchmark's scores (hand-computed), augmentation (the mask follows the
geometry exactly) and training loop (seeded, best epoch kept) on real H&E crops."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.downstream import (
    augment,
    build_classifier,
    build_segmenter,
    classification_scores,
    confusion,
    predict,
    segmentation_scores,
    train_model,
)
from histosynth.synthesis.errors import EngineError

ENCODER = "tu-mobilenetv3_small_050"  # a tiny timm encoder: fast on the CPU


def test_scores_by_hand():
    truth = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    predicted = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], bool)
    assert confusion(truth, predicted) == (2, 1, 1, 4)
    s = segmentation_scores(2, 1, 1, 4)
    assert s == {"iou": 0.5, "sensitivity": 2 / 3, "specificity": 0.8}
    c = classification_scores(2, 1, 1, 4)
    assert c["f1"] == pytest.approx(4 / 6) and c["specificity"] == 0.8
    assert math.isnan(segmentation_scores(0, 0, 0, 5)["sensitivity"])
    with pytest.raises(ValueError, match="shapes differ"):
        confusion(truth, predicted[:1])


def test_augmentation_moves_the_mask_with_the_image_and_keeps_tissue_colour():
    image = np.ascontiguousarray(he_source_image()[:64, :96])
    mask = np.zeros((64, 96), np.uint8)
    cv2.circle(mask, (20, 30), 9, 255, -1)
    seen = set()
    for seed in range(12):
        out, moved = augment(image, mask, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and moved.dtype == np.uint8
        assert moved.sum() == mask.sum()  # exact: a flip / turn, no interpolation
        assert out.shape[:2] == moved.shape
        seen.add((moved.shape, moved.tobytes()))
        # the stain jitter is small: the mean colour stays H&E-like
        assert np.abs(out.mean((0, 1)) - image.mean((0, 1))).max() < 25
    assert len(seen) >= 4  # several of the 8 dihedral elements drawn
    same, _ = augment(image, None, np.random.default_rng(0), stain_scale=0, stain_shift=0,
                      brightness=0, contrast=0)
    rng = np.random.default_rng(0)
    flip, turns = bool(rng.integers(2)), int(rng.integers(4))
    expected = np.rot90(image[:, ::-1] if flip else image, turns)
    assert np.abs(same.astype(int) - expected.astype(int)).max() <= 1  # exact OD round trip


def _data(n: int = 6, side: int = 64):
    he = he_source_image()
    images = np.stack([np.ascontiguousarray(he[i * 40 : i * 40 + side, :side]) for i in range(n)])
    masks = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) < 150 for im in images])
    return images, masks


def test_training_is_seeded_and_keeps_the_best_epoch():
    images, masks = _data()

    def run():
        torch.manual_seed(0)
        model = build_segmenter("unetplusplus", ENCODER)
        return train_model(model, "segmentation", (images[:4], masks[:4]),
                           (images[4:], masks[4:]), epochs=3, batch_size=2, seed=0,
                           augmented=True)

    a, b = run(), run()
    assert a.val_loss == b.val_loss and len(a.val_loss) == 3
    assert a.best_epoch == int(np.argmin(a.val_loss))
    predicted = predict(a.model, "segmentation", images[4:])
    assert predicted.shape == masks[4:].shape and predicted.dtype == bool
    np.testing.assert_array_equal(predicted, predict(b.model, "segmentation", images[4:]))


def test_classification_trains_and_predicts_labels():
    images, _ = _data()
    labels = np.array([0, 1, 0, 1, 0, 1])
    torch.manual_seed(0)
    model = build_classifier("mobilenetv3_small_050")
    trained = train_model(model, "classification", (images[:4], labels[:4]),
                          (images[4:], labels[4:]), epochs=2, batch_size=2)
    out = predict(trained.model, "classification", images)
    assert out.shape == (6,) and set(out.tolist()) <= {0, 1}


def test_bad_training_input_is_one_clear_error(tmp_path):
    images, masks = _data()
    model = build_segmenter("unetplusplus", ENCODER)
    with pytest.raises(EngineError, match="multiples of 32"):
        train_model(model, "segmentation", (images[:4, :48, :48], masks[:4, :48, :48]),
                    (images[4:, :48, :48], masks[4:, :48, :48]), epochs=1)
    with pytest.raises(EngineError, match="do not match"):
        train_model(model, "segmentation", (images, masks[:, :32]), (images, masks), epochs=1)
    with pytest.raises(EngineError, match="cannot build"):
        build_segmenter("unetplusplus", "no-such-encoder")
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(EngineError, match="does not fit"):
        build_classifier("mobilenetv3_small_050", tmp_path / "bad.pth")


def test_encoder_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = build_classifier("mobilenetv3_small_050")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = build_classifier("mobilenetv3_small_050", tmp_path / "w.pth")
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, loaded.state_dict()[key]), key
    seg = build_segmenter("unetplusplus", ENCODER)
    torch.save(seg.encoder.state_dict(), tmp_path / "enc.pth")
    again = build_segmenter("unetplusplus", ENCODER, tmp_path / "enc.pth")
    for key, value in seg.encoder.state_dict().items():
        assert torch.equal(value, again.encoder.state_dict()[key]), key
