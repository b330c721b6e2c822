"""Evaluation pieces on their own: FID maths, exact match, the feature networks from local and s3:// paths,
the held-out set and the shipped config. The full job on a registered version is in test_registry.py."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamllm_platform import storage
from dreamllm_platform.config import load_config
from dreamllm_platform.evaluation import EvalConfig, HeldOutSpec
from dreamllm_platform.evaluation.heldout import load_heldout
from dreamllm_platform.evaluation.metrics import (ClipScorer, InceptionFeatures, exact_match, frechet_distance,
                                                  normalize_answer)
from dreamllm_platform.evaluation.tiny import save_tiny_clip, save_tiny_inception

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------- FID

def test_fid_matches_the_gaussian_formula_computed_another_way():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.7
    # Tr sqrt(S_a S_b) = sum of the square roots of the eigenvalues of S_a S_b (real, >= 0 for PSD S).
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s_a @ s_b).real.clip(min=0)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_in_one_dimension_is_mean_and_std_gap():
    a = np.array([[0.0], [2.0], [4.0]])          # mean 2, var 4
    b = np.array([[10.0], [11.0], [12.0]])       # mean 11, var 1
    assert frechet_distance(a, b) == pytest.approx((2 - 11) ** 2 + (2 - 1) ** 2)


def test_fid_with_fewer_images_than_features_is_finite_and_needs_two():
    rng = np.random.default_rng(1)
    assert np.isfinite(frechet_distance(rng.normal(size=(4, 32)), rng.normal(size=(4, 32))))
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(rng.normal(size=(1, 8)), rng.normal(size=(4, 8)))


# ------------------------------------------------------------- exact match

@pytest.mark.parametrize("pred, gold, hit", [
    ("Red.", "red", True), ("the upper left", "upper left", True), ("  UPPER   left!", "upper left", True),
    ("red circle", "red", False), ("", "red", False), ("a circle", "circle", True)])
def test_exact_match_normalises_case_punctuation_and_articles(pred, gold, hit):
    assert exact_match(pred, gold) is hit
    assert normalize_answer("The  Star, a shape.") == "star shape"


# ------------------------------------------------------ feature networks

def _images():
    return [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green", "yellow")]


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory):
    d = tmp_path_factory.mktemp("features")
    return save_tiny_inception(d / "inception.pt"), save_tiny_clip(d / "clip")


def test_tiny_feature_networks_load_from_local_and_s3_paths_alike(tiny_features, s3):
    inception, clip = tiny_features
    remote = f"s3://{s3['bucket']}/eval-features"
    storage.write_bytes(f"{remote}/inception.pt", inception.read_bytes())
    for f in clip.iterdir():
        storage.write_bytes(f"{remote}/clip/{f.name}", f.read_bytes())
    local_feats = InceptionFeatures(str(inception), image_size=32)(_images())
    assert local_feats.shape == (4, 32)
    np.testing.assert_allclose(InceptionFeatures(f"{remote}/inception.pt", image_size=32)(_images()), local_feats)
    captions = ["a red square", "a blue square", "a green square", "a yellow square"]
    score = ClipScorer(str(clip))(_images(), captions)
    assert 0.0 <= score <= 100.0
    assert ClipScorer(f"{remote}/clip")(_images(), captions) == pytest.approx(score)


def test_a_bad_feature_network_path_is_named(tmp_path):
    (tmp_path / "not-a-model.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not-a-model.pt is not a TorchScript module"):
        InceptionFeatures(str(tmp_path / "not-a-model.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        InceptionFeatures(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="features.clip .* is not a saved CLIPModel"):
        ClipScorer(str(tmp_path))


# ---------------------------------------------------------- held-out set

def _spec(root, seed):
    return load_config(HeldOutSpec, None, [f"root={root}", f"synthetic.seed={seed}", "synthetic.pairs_per_shard=3",
                                           "synthetic.conversations=2", "max_pairs=3", "max_questions=3"])


def test_heldout_set_is_written_once_read_in_its_formats_and_digested(tmp_path):
    h = load_heldout(_spec(tmp_path / "a", 1000))
    assert len(h.pairs) == 3 and len(h.qa) == 3  # two conversations of two questions each, cut at 3
    caption, image = h.pairs[0]
    assert caption.startswith("A ") and image.size == (64, 64)
    _, question, answer = h.qa[0]
    assert question.endswith("?") and "<image>" not in question and answer
    assert load_heldout(_spec(tmp_path / "a", 1000)).digest == h.digest  # read again, not rewritten
    assert load_heldout(_spec(tmp_path / "b", 1000)).digest == h.digest  # the same seed writes the same set
    assert load_heldout(_spec(tmp_path / "c", 1001)).digest != h.digest


def test_missing_heldout_set_with_the_generator_off_is_an_error(tmp_path):
    spec = load_config(HeldOutSpec, None, [f"root={tmp_path}", "synthetic.enabled=false"])
    with pytest.raises(ValueError, match="no held-out set at"):
        load_heldout(spec)


# ----------------------------------------------------------------- config

def test_configs_evaluate_yaml_is_the_embedded_defaults_and_bad_values_are_named():
    assert load_config(EvalConfig, ROOT / "configs/evaluate.yaml") == EvalConfig()
    with pytest.raises(ValueError, match="text_to_image must be 0 or >= 2"):
        load_config(EvalConfig, None, ["text_to_image=1"])
    with pytest.raises(ValueError, match="valid keys under features"):
        load_config(EvalConfig, None, ["features.inceptoin=x"])
