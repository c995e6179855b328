"""The inference adapter (`geoloc.inference.adapter`) on tiny GeoCLIP and GeoHier models: answers equal to
`model.geolocate`, per-input errors, declared capabilities and extras, JSON-safe results, the pipeline over both
models, `geoloc.DEFAULT_MODEL` from any folder, and a `--help` that loads no torch."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import geoloc
import geoloc.pipeline  # noqa: F401  (registers the image-geolocation task)
from geoloc.configs import byte_level_clip_tokenizer, tiny_geoclip_config, tiny_geohier_config, tiny_image_processor
from geoloc.geography.geocells import build_geocells
from geoloc.inference.adapter import UNCERTAINTY_POINTS, Capabilities, GeolocationResult, Geolocator
from geoloc.data.worldmap import sample_points
from geoloc.inference.runner import Schema, predictions_frame
from modeling_geoclip import GeoCLIPModel
from modeling_geohier import GeoHierModel

CITIES = np.array([[48.8566, 2.3522], [40.7128, -74.006], [-33.8688, 151.2093], [35.6762, 139.6503],
                   [-1.2921, 36.8219], [64.1466, -21.9426]])


def tiny_geohier(trained_with_scene_labels: bool) -> GeoHierModel:
    points = sample_points(2000, np.random.default_rng(2))
    cells, _ = build_geocells(points[:, 0], points[:, 1], levels=[(5, 400), (5, 150), (5, 60)])
    config = tiny_geohier_config(cells_per_level=[len(level["tokens"]) for level in cells],
                                 trained_with_scene_labels=trained_with_scene_labels, id2label={0: "beach", 1: "city",
                                                                                    2: "forest", 3: "snow"})
    torch.manual_seed(0)
    model = GeoHierModel(config).eval()
    model.set_cell_table(cells)
    return model


@pytest.fixture(scope="module")
def geoclip() -> Geolocator:
    torch.manual_seed(0)
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    model.set_gallery(CITIES)
    return Geolocator(model, tiny_image_processor(), byte_level_clip_tokenizer(), name="tiny GeoCLIP")


@pytest.fixture(scope="module")
def geohier() -> Geolocator:
    return Geolocator(tiny_geohier(trained_with_scene_labels=True), tiny_image_processor("geohier"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8) for i in range(4)]


def reference(geolocator: Geolocator, images, top_k: int, **inputs):
    """`model.geolocate` called directly on the processed images (or on `inputs`)."""
    if images is not None:
        inputs = {"pixel_values": geolocator.image_processor(images, return_tensors="pt").pixel_values}
    with torch.no_grad():
        return geolocator.model.geolocate(**inputs, top_k=top_k)


def assert_matches(results: list[GeolocationResult], output) -> None:
    assert len(results) == len(output.latitudes)
    for row, result in enumerate(results):
        assert result.error is None
        assert result.latitudes.tolist() == output.latitudes[row].double().tolist()
        assert result.longitudes.tolist() == output.longitudes[row].double().tolist()
        np.testing.assert_allclose(result.probabilities, output.probabilities[row].double().numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------- answers and errors
@pytest.mark.parametrize("name", ["geoclip", "geohier"])
def test_images_of_every_kind_match_geolocate_and_bad_ones_are_reported(name, pictures, tmp_path, request):
    geolocator = request.getfixturevalue(name)
    path = tmp_path / "photo.png"
    Image.fromarray(pictures[0]).save(path)
    buffer = io.BytesIO()
    Image.fromarray(pictures[1]).save(buffer, format="PNG")
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    inputs = [str(path), buffer.getvalue(), str(broken), Image.fromarray(pictures[2]), {"bytes": None, "path": str(path)},
              pictures[3]]
    results = geolocator.locate_images(inputs, top_k=3, batch_size=4)
    assert [r.input for r in results] == [str(path), "image 2", str(broken), "image 4", str(path), "image 6"]
    assert "broken.jpg' is not an image file" in results[2].error and len(results[2].latitudes) == 0
    readable = [pictures[0], pictures[1], pictures[2], pictures[0], pictures[3]]
    assert_matches([r for r in results if r.error is None], reference(geolocator, readable, 3))


@pytest.mark.parametrize("name", ["geoclip", "geohier"])
def test_each_image_is_decoded_once_with_the_checkpoints_own_limit(name, pictures, tmp_path, request, monkeypatch):
    """One image path: each file is opened for decoding once (the processor receives the decoded image and does
    not decode it again), and an image over this checkpoint's `max_image_pixels` is skipped and reported
    while the rest of its batch is answered."""
    geolocator = request.getfixturevalue(name)
    limit = 48 * 50
    monkeypatch.setattr(geolocator.image_processor, "max_image_pixels", limit)
    paths = []
    for index, picture in enumerate(pictures):  # 40, 47, 54 and 61 rows of 50 pixels: the last two are over
        paths.append(str(tmp_path / f"p{index}.png"))
        Image.fromarray(np.pad(picture, ((0, 6 * index), (0, 0), (0, 0)))).save(paths[-1])
    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda source, *a, **k: opened.append(str(source)) or original_open(source, *a, **k))
    results = geolocator.locate_images(paths, top_k=2, batch_size=4)
    assert [r.error is None for r in results] == [True, True, False, False]
    assert f"above the limit of {limit} pixels" in results[2].error and len(results[2].latitudes) == 0
    assert sorted(opened) == sorted(paths), opened  # each file opened once (its header check included)
    readable = [np.asarray(original_open(path)) for path in paths[:2]]
    assert_matches(results[:2], reference(geolocator, readable, 2))


@pytest.mark.parametrize("name", ["geoclip", "geohier"])
def test_decoding_ahead_on_threads_gives_the_same_answers_in_order(name, pictures, tmp_path, request):
    """`decode_workers` (the dataset runner's default: 2) decodes and processes the next batches on threads
    while the model runs: every answer and error is the one-thread path's, in input order."""
    geolocator = request.getfixturevalue(name)
    inputs = []
    for index in range(11):
        if index in (3, 8):
            inputs.append(b"not an image")
        else:
            inputs.append(np.roll(pictures[index % 4], index, axis=1))
    plain = geolocator.locate_images(inputs, top_k=2, batch_size=2)
    for workers in (1, 3):
        ahead = geolocator.locate_images(inputs, top_k=2, batch_size=2, decode_workers=workers)
        assert [r.input for r in ahead] == [r.input for r in plain]
        assert [r.error for r in ahead] == [r.error for r in plain] and plain[3].error and plain[8].error
        for mine, theirs in zip(ahead, plain):
            assert mine.latitudes.tolist() == theirs.latitudes.tolist()
            assert mine.probabilities.tolist() == theirs.probabilities.tolist()
    if name == "geohier":  # ten crops are processed ahead too
        ten = geolocator.locate_images(inputs, top_k=2, batch_size=2, ten_crop=True)
        ten_ahead = geolocator.locate_images(inputs, top_k=2, batch_size=2, ten_crop=True, decode_workers=2)
        assert [r.latitudes.tolist() for r in ten_ahead] == [r.latitudes.tolist() for r in ten]


def test_texts_match_geolocate_and_unreadable_texts_are_reported(geoclip):
    texts = ["a beach with palm trees", "   ", "y" * 200, "snow"]
    results = geoclip.locate_texts(texts, top_k=2)
    assert results[1].error.startswith("The text is empty")
    assert "too long for this model (202 tokens, it reads at most 77)"  # 200 bytes + BOS + EOS in results[2].error
    tokens = geoclip.tokenizer([texts[0], texts[3]], padding=True, return_tensors="pt")
    assert_matches([results[0], results[3]], reference(geoclip, None, 2, input_ids=tokens.input_ids,
                                                       attention_mask=tokens.attention_mask))


def test_bad_arguments_raise(geoclip, geohier, pictures):
    with pytest.raises(ValueError, match=f"top_k must be between 1 and {len(CITIES)}"):
        geoclip.locate_images(pictures[:1], top_k=len(CITIES) + 1)
    with pytest.raises(ValueError, match="reads images only"):
        geohier.locate_texts(["a beach"])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        geoclip.locate_images(pictures[:1], batch_size=0)
    with pytest.raises(ValueError, match="names has 1 entries for 2 images"):
        geoclip.locate_images(pictures[:2], names=["a"])
    empty = GeoCLIPModel(tiny_geoclip_config())
    with pytest.raises(ValueError, match=r"no candidate locations \(its gallery is empty\): call model.set_gallery"):
        Geolocator(empty, tiny_image_processor()).locate_images(pictures[:1])


# ---------------------------------------------------------------------------------- capabilities and extras
def test_capabilities_are_what_the_models_declare(geoclip, geohier):
    assert geoclip.capabilities == Capabilities(text=True, scenes=False, attention=False, uncertainty="gallery")
    assert geohier.capabilities == Capabilities(text=False, scenes=True, attention=True, uncertainty="cells",
                                                text_aligned=False)
    without_text = GeoCLIPModel(tiny_geoclip_config(use_text_tower=False))
    assert Geolocator(without_text, tiny_image_processor()).capabilities.text is False
    assert Geolocator(tiny_geohier(trained_with_scene_labels=False), tiny_image_processor("geohier")).capabilities.scenes is False
    with pytest.raises(ValueError, match="Linear does not declare its geolocation capabilities"):
        Geolocator(torch.nn.Linear(2, 2), tiny_image_processor())


def test_geoclip_extras_are_the_gallery_as_uncertainty(geoclip, pictures):
    [result] = geoclip.locate_images(pictures[:1], top_k=2, extras=True)
    assert result.uncertainty.shape == (len(CITIES), 3)  # the whole (small) gallery, best first
    np.testing.assert_array_equal(result.uncertainty[:2], np.stack(
        [result.latitudes, result.longitudes, result.probabilities], axis=1))
    assert result.uncertainty[:, 2].sum() == pytest.approx(1, abs=1e-5)
    assert sorted(map(tuple, result.uncertainty[:, :2].tolist())) == sorted(map(tuple, CITIES.tolist()))
    assert result.scenes is None and result.attention is None
    [plain] = geoclip.locate_images(pictures[:1], top_k=2)
    assert plain.uncertainty is None and plain.latitudes.tolist() == result.latitudes.tolist()


def test_geohier_extras_are_scenes_attention_and_cells(geohier, pictures):
    [result] = geohier.locate_images(pictures[:1], top_k=3, extras=True)
    output = reference(geohier, pictures[:1], geohier.model.num_candidates)
    # every fine cell, best first (attention maps come from the eager attention path: equal to ~1e-6)
    np.testing.assert_allclose(result.uncertainty[:, 2], output.probabilities[0].double().numpy(), rtol=1e-5)
    assert result.uncertainty.shape == (min(UNCERTAINTY_POINTS, geohier.model.num_candidates), 3)
    with torch.no_grad():
        scenes = geohier.model.geolocate(
            pixel_values=geohier.image_processor(pictures[:1], return_tensors="pt").pixel_values
        ).scene_probabilities[0]
    assert list(result.scenes) == ["beach", "city", "forest", "snow"]
    np.testing.assert_allclose(list(result.scenes.values()), scenes.numpy(), rtol=1e-6)
    assert [m.caption for m in result.attention] == [
        "level 1 of 3 (coarsest)", "level 2 of 3 (middle)", "level 3 of 3 (finest)"]
    for level in result.attention:
        assert level.weights.shape == (4, 4) and level.weights.min() == 0 and level.weights.max() == 1
        assert level.overlay.size == (224, 224)
    untrained = Geolocator(tiny_geohier(trained_with_scene_labels=False), tiny_image_processor("geohier"))
    [result] = untrained.locate_images(pictures[:1], top_k=3, extras=True)
    assert result.scenes is None and len(result.attention) == 3


def test_answers_carry_their_candidate_ids_for_both_models(geoclip, geohier, pictures):
    """GeoCLIP: the gallery row of each answer; GeoHier: the fine cell's S2 token; in to_dict and the dataset
    output too (nothing downstream rebuilds ids from coordinates)."""
    [clip] = geoclip.locate_images(pictures[:1], top_k=3, extras=True)
    for row, lat, lon in zip(clip.candidate_ids, clip.latitudes, clip.longitudes):
        assert CITIES[row].tolist() == pytest.approx([lat, lon], abs=1e-6)
    assert clip.uncertainty_ids[:3] == clip.candidate_ids
    assert sorted(clip.uncertainty_ids) == list(range(len(CITIES)))
    [hier] = geohier.locate_images(pictures[:1], top_k=3, extras=True)
    fine = geohier.model.get_cell_table()[-1]
    for token, lat, lon in zip(hier.candidate_ids, hier.latitudes, hier.longitudes):
        row = fine["tokens"].index(token)
        assert [fine["latitudes"][row], fine["longitudes"][row]] == pytest.approx([lat, lon], abs=1e-6)
    assert hier.uncertainty_ids[:3] == hier.candidate_ids
    assert sorted(hier.uncertainty_ids) == sorted(fine["tokens"])  # every fine cell once (a small table)
    assert [p["candidate"] for p in hier.to_dict()["predictions"]] == hier.candidate_ids
    frame = predictions_frame([clip, hier], Schema())
    assert frame["candidate"].tolist() == [str(row) for row in clip.candidate_ids] + hier.candidate_ids


def test_places_and_json(geoclip, pictures):
    results = geoclip.locate_images([pictures[0], b"broken"], top_k=len(CITIES), places=True, extras=True)
    by_city = {place["place"]: place for place in results[0].places}
    assert by_city["Paris"]["country"] == "France" and by_city["Paris"]["km"] < 10
    assert results[1].places is None
    results[0].probabilities[1] = np.nan  # as from a broken checkpoint: never a bare NaN in JSON
    answers = json.loads(json.dumps([result.to_dict() for result in results], allow_nan=False))
    assert answers[0]["predictions"][1]["probability"] is None
    assert answers[0]["predictions"][0]["place"] == results[0].places[0]["place"]
    assert len(answers[0]["uncertainty"]) == len(CITIES) and answers[0]["error"] is None
    assert answers[1] == {"input": "image 2", "error": results[1].error, "predictions": []}


# ----------------------------------------------------------------------------------------- front ends
def test_pipeline_answers_like_the_adapter_for_both_models(geoclip, geohier, pictures):
    for geolocator in (geoclip, geohier):
        geolocating = pipeline("image-geolocation", model=geolocator.model,
                               image_processor=geolocator.image_processor)
        expected = geolocator.locate_images(pictures, top_k=2)
        for answer, result in zip(geolocating(pictures, top_k=2, batch_size=2), expected):
            assert [(p["latitude"], p["longitude"]) for p in answer] == list(zip(result.latitudes, result.longitudes))


def test_default_model_from_any_folder(tmp_path):
    """`geoloc.DEFAULT_MODEL` and `--model default` work outside the repository."""
    code = ("import geoloc, json; from geoloc import Geolocator; from transformers import AutoModel; "
            "g = Geolocator.from_pretrained(geoloc.DEFAULT_MODEL); "
            "r = g.locate_texts(['hot desert'], top_k=2)[0]; "
            "print(json.dumps([AutoModel.from_pretrained(geoloc.DEFAULT_MODEL).config.model_type, r.to_dict()]))")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    model_type, answer = json.loads(found.stdout.splitlines()[-1])
    expected = Geolocator.from_pretrained("default").locate_texts(["hot desert"], top_k=2)[0].to_dict()
    assert model_type == "geoclip" and answer == expected
    completed = subprocess.run([sys.executable, "-m", "geoloc.inference.predict", "--text", "hot desert", "--model", "default",
                                "--top-k", "2", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(completed.stdout) == [expected]


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"]])
def test_help_loads_no_torch_and_shows_defaults(argv):
    code = ("import sys\nfrom geoloc.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'datasets', 'accelerate') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert completed.stdout.splitlines()[-1] == "[]"
    if argv[0] == "predict":
        help_text = " ".join(completed.stdout.split())
        assert "predictions per input (default: 5)" in help_text and "(default: default)" in help_text


def test_geohier_scenes_are_shown_by_their_id2scene_names(pictures):
    model = tiny_geohier(trained_with_scene_labels=True)
    model.config.id2scene = {0: "coast", 1: "urban", 2: "forest", 3: "ice"}
    [result] = Geolocator(model, tiny_image_processor("geohier")).locate_images(pictures[:1], top_k=1, extras=True)
    assert list(result.scenes) == ["coast", "urban", "forest", "ice"]
    with pytest.raises(Exception, match="id2scene maps scene ids"):  # transformers wraps the config's ValueError
        tiny_geohier_config(cells_per_level=[2, 4], id2scene={"0": "coast", "7": "nowhere"})
