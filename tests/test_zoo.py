"""The zoo's weights, architectures, preprocessing and data are real: checked against known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enginekit.models import get_spec, zoo_names


@pytest.fixture(scope="module")
def efficientnet():
    return get_spec("efficientnet_lite0").build()


def _top1(module, image: np.ndarray) -> int:
    from enginekit.models.efficientnet_lite import preprocess_image

    with torch.no_grad():
        return int(module(torch.from_numpy(preprocess_image(image))).argmax(1))


def test_efficientnet_sees_a_cat_in_chelsea(efficientnet):
    import skimage.data

    from enginekit.models.efficientnet_lite import class_names

    label = _top1(efficientnet, skimage.data.chelsea())
    assert 281 <= label <= 285, f"chelsea labelled {label} ({class_names()[label]})"


def test_efficientnet_sees_espresso_in_coffee(efficientnet):
    import skimage.data

    assert _top1(efficientnet, skimage.data.coffee()) == 967


def test_imagenet_class_names_are_complete():
    from enginekit.models.efficientnet_lite import class_names

    names = class_names()
    assert len(names) == 1000 and names[967] == "espresso" and names[281] == "tabby"


def test_digits_cnn_reaches_97_percent():
    from enginekit.models.digits_cnn_net import test_accuracy

    assert test_accuracy(get_spec("digits_cnn").build()) >= 0.97


def test_minilm_matches_sentence_transformers(monkeypatch):
    """Independent reference: the sentence-transformers pipeline on the same packaged files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from enginekit.models import minilm

    sentences = ["A man is eating food.", "Quantization trades precision for speed.", "Is it going to rain tomorrow?"]
    feeds = minilm.tokenize(sentences, 32)
    with torch.no_grad():
        ours = get_spec("minilm_l6").build()(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(sentences, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert float(ours[0] @ ours[1]) < 0.5  # unrelated sentences are not near-duplicates


def test_crop_splits_are_real_disjoint_and_deterministic():
    dataset = get_spec("efficientnet_lite0").dataset()
    calibration = dataset.samples("calibration", 8)["image"]
    evaluation = dataset.samples("evaluation", 8)["image"]
    assert calibration.shape == (8, 3, 224, 224) and calibration.dtype == np.float32
    assert -1.0 <= calibration.min() and calibration.max() <= 1.0
    np.testing.assert_array_equal(calibration, dataset.samples("calibration", 8)["image"])
    assert not np.array_equal(calibration, evaluation)
    # photographs, not noise: neighbouring pixels are strongly correlated
    flat = calibration[:, :, :, :-1].ravel(), calibration[:, :, :, 1:].ravel()
    assert np.corrcoef(*flat)[0, 1] > 0.8


def test_sentence_splits_are_disjoint_and_padded_to_the_asked_length():
    from enginekit.models.minilm import sentence_splits

    splits = sentence_splits()
    assert len(splits["calibration"]) >= 150 and len(splits["evaluation"]) >= 150
    assert not set(splits["calibration"]) & set(splits["evaluation"])
    feeds = get_spec("minilm_l6").dataset().samples("evaluation", 4, {"sequence": 128})
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape == (4, 128)
    assert (feeds["input_ids"][:, 0] == 101).all()  # [CLS]


def test_digits_splits_have_labels():
    dataset = get_spec("digits_cnn").dataset()
    assert dataset.samples("evaluation", 10)["image"].shape == (10, 1, 8, 8)
    assert dataset.labels("evaluation", 10).shape == (10,)
    assert dataset.size("calibration") + dataset.size("evaluation") == 1797


def test_zoo_list_describes_every_model(run_cli):
    result = run_cli("zoo", "list")
    assert result.code == 0
    for name in zoo_names():
        assert name in result.out
    assert "4,652,008" in result.out  # EfficientNet-Lite0 parameter count
    assert result.out.count("metric") == len(zoo_names())


def test_zoo_list_imports_no_framework_and_its_parameter_counts_are_the_architectures():
    """`zoo list` reads declared parameter counts (no torch or TensorFlow import, well under a
    second); each one is what the built architecture has."""
    import subprocess
    import sys

    from enginekit.models import get_spec, zoo_names

    done = subprocess.run([sys.executable, "-c", "import sys, runpy\nsys.argv=['enginekit','zoo','list']\n"
                           "try:\n    runpy.run_module('enginekit', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                           "print('heavy:', sorted(m for m in ('torch', 'tensorflow', 'keras', 'sklearn') if m in sys.modules))"],
                          capture_output=True, text=True, check=True)
    assert "heavy: []" in done.stdout and "efficientnet_lite0" in done.stdout, done.stdout + done.stderr
    for name in zoo_names():
        spec = get_spec(name)
        assert spec.parameters == spec.parameter_count(), name
