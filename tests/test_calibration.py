"""Calibrated confidence and "I can't tell" (geoloc/calibration.py, `geoloc calibrate`, the adapter's fields)."""

import json
import shutil

import numpy as np
import pytest
import torch

from geoloc import DEFAULT_MODEL
from geoloc.inference import calibration as C
from geoloc.cli import main as cli
from geoloc.configs import tiny_geoclip_config, tiny_geohier_config, tiny_image_processor
from geoloc.geography.geocells import build_geocells
from geoloc.inference.adapter import Geolocator
from geoloc.data.worldmap import build_worldmap_splits, sample_points, write_imagefolder
from modeling_geoclip import GeoCLIPModel
from modeling_geohier import GeoHierModel
from unfamiliar_images import blank_images, noise_images, one_pixel_images, photo_like_images


def test_isotonic_map_turns_scores_into_frequencies():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=4000)
    outcomes = rng.uniform(size=4000) < scores**3  # an overconfident score: frequency = score^3
    knots = C.isotonic_knots(scores[:2000], outcomes[:2000])
    assert all(b > a for a, b in zip(knots["x"], knots["x"][1:]))
    assert all(b >= a for a, b in zip(knots["y"], knots["y"][1:])) and 0 <= min(knots["y"]) <= max(knots["y"]) <= 1
    held_out, truth = scores[2000:], outcomes[2000:]
    raw = C.expected_calibration_error(held_out, truth)
    calibrated = C.expected_calibration_error(C.apply_knots(knots, held_out), truth)
    assert raw > 0.15 and calibrated < 0.04


def test_mass_near_best_counts_candidates_within_each_radius():
    # best guess at (0, 0); 0.3 lies ~111 km east, 0.2 ~1,112 km north
    masses = C.mass_near_best([[0, 0, 10]], [[0, 1, 0]], [[0.5, 0.3, 0.2]], radii_km=(25, 200, 750, 2500))
    np.testing.assert_allclose(masses, [[0.5, 0.8, 0.8, 1.0]])


def _copy_of_bundled(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    return folder, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("breakage, message", [
    (lambda c: c[C.CALIBRATION_KEY]["maps"][2]["y"].reverse(), "monotone"),
    (lambda c: c[C.CALIBRATION_KEY]["maps"].pop(), "one map per radius"),
    (lambda c: c[C.CALIBRATION_KEY]["maps"][0]["y"].__setitem__(0, 1.5), r"\[0, 1\]"),
    (lambda c: c[C.FAMILIARITY_KEY]["clusters"][0]["mean"].pop(), "mean must hold 128"),
    (lambda c: c[C.FAMILIARITY_KEY].__setitem__("threshold", -1), "threshold"),
])
def test_a_bad_calibration_fails_the_load_naming_the_field(tmp_path, breakage, message):
    folder, config = _copy_of_bundled(tmp_path)
    breakage(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        Geolocator.from_pretrained(folder)


@pytest.fixture(scope="module")
def bundled():
    return Geolocator.from_pretrained(DEFAULT_MODEL)


def test_bundled_model_says_it_cannot_tell_for_what_it_never_saw(bundled):
    rng = np.random.default_rng(21)
    for kind, images in [("blank", blank_images(rng, 60)), ("1x1", one_pixel_images(rng, 60)),
                         ("noise", noise_images(rng, 30)), ("photo-like", photo_like_images(rng, 30))]:
        flagged = np.mean([result.unfamiliar for result in bundled.locate_images(images, top_k=1)])
        assert flagged >= 0.95, (kind, flagged)
    crops = build_worldmap_splits(1, 300, seed=2101)["test"]  # fresh held-out map crops
    results = bundled.locate_images(crops["image"], top_k=1)
    assert np.mean([result.unfamiliar for result in results]) <= 0.05


def test_bundled_model_confidence_is_calibrated_and_consistent(bundled):
    crops = build_worldmap_splits(1, 300, seed=2102)["test"]
    results = bundled.locate_images(crops["image"], top_k=3)
    for result in results:
        values = list(result.confidence.values())
        assert list(result.confidence) == [25, 200, 750, 2500]
        assert all(0 <= v <= 1 for v in values) and values == sorted(values)
        radius, probability = result.headline_confidence
        assert result.confidence[radius] == probability
        assert result.to_dict()["confidence"][0] == {"radius_km": 25, "probability": result.confidence[25]}
    errors = C._haversine_km(crops["latitude"], crops["longitude"], [r.latitudes[0] for r in results],
                             [r.longitudes[0] for r in results])
    for radius in (750, 2500):  # small sample: a looser bound than the README's 1,000-crop measurement
        ece = C.expected_calibration_error([r.confidence[radius] for r in results], errors <= radius)
        assert ece <= 0.08, (radius, ece)


def _tiny_models(folder):
    torch.manual_seed(0)
    geoclip = GeoCLIPModel(tiny_geoclip_config()).eval()
    geoclip.set_gallery(sample_points(300, np.random.default_rng(1)))
    geoclip.save_pretrained(folder / "geoclip")
    tiny_image_processor("geoclip").save_pretrained(folder / "geoclip")
    points = sample_points(600, np.random.default_rng(2))
    cells, _ = build_geocells(points[:, 0], points[:, 1], levels=[(5, 200), (5, 60)])
    geohier = GeoHierModel(tiny_geohier_config(cells_per_level=[len(level["tokens"]) for level in cells])).eval()
    geohier.set_cell_table(cells)
    geohier.save_pretrained(folder / "geohier")
    tiny_image_processor("geohier").save_pretrained(folder / "geohier")


@pytest.mark.parametrize("name", ["geoclip", "geohier"])
def test_calibrate_command_stores_what_the_adapter_reads_for_both_models(tmp_path_factory, name, capsys):
    root = tmp_path_factory.getbasetemp() / "calibrate"
    if not (root / "data").exists():
        write_imagefolder(build_worldmap_splits(1, 40, seed=5, validation=80), str(root / "data"))
        _tiny_models(root)
    model = root / name
    assert cli(["calibrate", str(model), "--dataset", str(root / "data"), "--test-split", "test"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["n"] == 80 and set(summary["held_out"]) == {"25km", "200km", "750km", "2500km"}
    config = json.loads((model / "config.json").read_text())
    assert config[C.CALIBRATION_KEY]["held_out"]["n"] == 40
    geolocator = Geolocator.from_pretrained(model)
    [noise, crop] = geolocator.locate_images([noise_images(np.random.default_rng(0), 1)[0],
                                              build_worldmap_splits(1, 1, seed=9)["test"][0]["image"]], top_k=2)
    for result in (noise, crop):
        assert list(result.confidence) == [25, 200, 750, 2500] and isinstance(result.unfamiliar, bool)
    assert noise.unfamiliarity > crop.unfamiliarity and noise.unfamiliar


def test_an_invalid_calibration_can_be_refitted(tmp_path, capsys):
    folder, config = _copy_of_bundled(tmp_path)
    config[C.CALIBRATION_KEY]["maps"][1]["y"].reverse()
    (folder / "config.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    write_imagefolder(build_worldmap_splits(1, 1, seed=6, validation=70), str(data))
    assert cli(["calibrate", str(folder), "--dataset", str(data), "--output-dir", str(tmp_path / "fixed")]) == 0
    assert Geolocator.from_pretrained(tmp_path / "fixed").calibration["n"] == 70


def test_calibrate_failures_are_one_line(tmp_path, capsys):
    assert cli(["calibrate", str(tmp_path / "missing"), "--dataset", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("geoloc calibrate: error:") and error.count("\n") == 1


def test_model_card_shows_the_held_out_reliability_table():
    from geoloc.models import register_models
    from geoloc.hub.publish import render_model_card
    from transformers import AutoConfig

    register_models()
    config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    card = str(render_model_card(config, "someone/geoclip-worldmap-tiny", []))
    held_out = config.geoloc_calibration["held_out"]
    assert "## Confidence and unfamiliar inputs" in card
    for radius in (25, 200, 750, 2500):
        assert f"| {radius:,} km | {held_out[f'{radius}km']['ece']:.3f} |" in card


def test_training_can_end_with_a_calibration_on_a_validation_split(tmp_path, capsys):
    from geoloc.training.train import main as train

    data, output = tmp_path / "data", tmp_path / "run"
    write_imagefolder(build_worldmap_splits(48, 1, seed=3, validation=40), str(data))
    assert train(["--model", "geoclip", "--dataset", str(data), "--output-dir", str(output), "--max-steps", "2",
                  "--batch-size", "16", "--augmentation", "none", "--calibrate-split", "validation"]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config[C.CALIBRATION_KEY]["n"] == 40 and config[C.CALIBRATION_KEY]["split"] == "validation"
    assert config[C.FAMILIARITY_KEY]["statistics_split"] == "train" and config[C.FAMILIARITY_KEY]["n"] == 48
    assert config["text_aligned"] is False  # tiny random towers: no text mode
    [result] = Geolocator.from_pretrained(output).locate_images(build_worldmap_splits(1, 1, seed=4)["test"]["image"])
    assert result.confidence is not None and result.unfamiliar is not None
