"""The Gradio Space (`spaces/geolocation/`): its answers and page rendering as functions, the app run as
`python app.py` in a subprocess (the bundled GeoCLIP and a tiny GeoHier) through `gradio_client` (answers
against the adapter as reference, readable errors without server tracebacks, 20 concurrent clients, one query
per client at a time, uploads deleted), the page in headless Chromium at 1280x900 and on a 390 px phone (ranked
pins, zoom, share link round trip, downloads, errors that keep the answer, no request off the machine; the
first answer's latency is printed), and `geoloc space` (the folder uploaded as the Space)."""

import ast
import base64
import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import s2geometry as s2
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import geoloc.hub.space
from geoloc import DEFAULT_MODEL
from geoloc.configs import byte_level_clip_tokenizer, tiny_geoclip_config, tiny_geohier_config, tiny_image_processor
from geoloc.geography.geocells import build_geocells
from geoloc.geography.geodesy import geodesic_distance_km
from geoloc.inference.adapter import GeolocationResult, Geolocator, nearest_places
from geoloc.data.worldmap import sample_points
from modeling_geoclip import GeoCLIPModel
from modeling_geohier import GeoHierModel

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "spaces" / "geolocation"
sys.path.insert(0, str(SPACE))
import answers  # noqa: E402  (the Space's modules, imported as app.py imports them)
import page  # noqa: E402

EXAMPLE = SPACE / "examples" / "alps.png"
BUNDLED = (Path(DEFAULT_MODEL) / "config.json").is_file()
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OFF_MACHINE = re.compile(r"(?!(http://127\.0\.0\.1|data:|blob:))")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="Debian chromium is not installed (apt-get install -y chromium)")


# ----------------------------------------------------------------------------------------------- fixtures
def save_tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    """A tiny GeoCLIP (gallery, processor, tokenizer) and a tiny GeoHier (cell table, processor; trained with
    scene labels, so that the page shows its scenes) on disk."""
    geoclip = GeoCLIPModel(tiny_geoclip_config())
    geoclip.set_gallery(sample_points(1500, np.random.default_rng(1)))
    points = sample_points(3000, np.random.default_rng(2))
    cells, _ = build_geocells(points[:, 0], points[:, 1], levels=[(5, 400), (5, 150), (5, 60)])
    geohier = GeoHierModel(tiny_geohier_config(cells_per_level=[len(level["tokens"]) for level in cells],
                                               trained_with_scene_labels=True))
    geohier.set_cell_table(cells)
    for name, model in (("geoclip", geoclip), ("geohier", geohier)):
        model.save_pretrained(root / name)
        tiny_image_processor(name).save_pretrained(root / name)
    byte_level_clip_tokenizer().save_pretrained(root / "geoclip")
    return root / "geoclip", root / "geohier"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def served_models(checkpoints):
    """What the test server runs: the bundled GeoCLIP (or the tiny one where it is not installed), then GeoHier."""
    return [Path(DEFAULT_MODEL) if BUNDLED else checkpoints[0], checkpoints[1]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SpaceServer:
    """`python spaces/geolocation/app.py` in a subprocess on a free loopback port."""

    def __init__(self, models: list[Path], folder: Path, **env):
        self.folder, self.log = folder, folder / "app.log"
        self.uploads = folder / "uploads"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        environment = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                       "GEOLOC_MODEL": ",".join(map(str, models)), "GRADIO_ANALYTICS_ENABLED": "False",
                       "GRADIO_TEMP_DIR": str(self.uploads), "HF_HUB_OFFLINE": "1", **env}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, str(SPACE / "app.py")], env=environment, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"The app did not start:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(served_models, tmp_path_factory):
    space = SpaceServer(served_models, tmp_path_factory.mktemp("server"))
    yield space
    space.stop()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def reference(served_models):
    """The served models loaded here: what the Space must answer, through the same adapter."""
    return [Geolocator.from_pretrained(source) for source in served_models]


def model_names() -> tuple[str, str]:
    return (answers.BUNDLED_NAME if BUNDLED else "geoclip"), "geohier"


# ------------------------------------------------------------------------------------- answers (functions)
def test_display_names_never_show_server_paths(checkpoints, tmp_path):
    other = tmp_path / "elsewhere" / "geohier"
    shutil.copytree(checkpoints[1], other)
    geolocators, note = answers.load_geolocators(f" {checkpoints[1]} , {checkpoints[0]}, {other},")
    assert list(geolocators) == ["geohier", "geoclip", "geohier (2)"] and note == ""
    assert [g.name for g in geolocators.values()] == list(geolocators)  # the adapter's messages use them too
    with pytest.raises(ValueError, match=r"^The model geohier reads images only") as error:
        answers.locate(geolocators["geohier"], text="a beach", top_k=3)
    assert str(tmp_path) not in str(error.value)
    assert answers.display_name("default") == answers.BUNDLED_NAME
    assert answers.display_name("someone/geoclip-vit-l14") == "someone/geoclip-vit-l14"


def test_default_model_is_the_bundled_one_or_a_random_tiny_one(monkeypatch, tmp_path):
    monkeypatch.delenv("GEOLOC_MODEL", raising=False)
    geolocators, note = answers.load_geolocators()
    assert list(geolocators) == [answers.BUNDLED_NAME if BUNDLED else answers.RANDOM_NAME]
    assert note == answers.NOTES["bundled" if BUNDLED else "random"]
    monkeypatch.setattr(answers, "BUNDLED_MODEL", tmp_path / "missing")
    geolocators, note = answers.load_geolocators("")
    (name, geolocator), = geolocators.items()
    assert name == answers.RANDOM_NAME and note == answers.NOTES["random"]
    with pytest.raises(ValueError, match="top_k must be between 1 and 20"):
        answers.locate(geolocator, text="a volcano", top_k=0)
    answer = answers.locate(geolocator, text="a volcano", top_k=2)
    assert answer.result.uncertainty.shape == (3000, 3)  # the 3000 most probable of 4096 gallery points
    np.testing.assert_allclose(answer.result.uncertainty[:2, 2], answer.result.probabilities)


def test_random_tiny_geolocator_is_reproducible():
    first, second = answers.random_tiny_geolocator(), answers.random_tiny_geolocator()
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    a, b = (answers.locate(g, image=image, top_k=3).result for g in (first, second))
    np.testing.assert_array_equal(a.latitudes, b.latitudes)


def result_at(points: list[tuple[float, float, float]], top_k: int = 2) -> GeolocationResult:
    """A result whose distribution is `points` (latitude, longitude, probability), best first."""
    table = np.array(points, dtype=float)
    return GeolocationResult(input="test", latitudes=table[:top_k, 0], longitudes=table[:top_k, 1],
                             probabilities=table[:top_k, 2], places=nearest_places(table[:top_k, 0],
                                                                                   table[:top_k, 1]),
                             uncertainty=table)


def test_country_shares_sum_the_distribution_by_country_or_sea():
    result = result_at([(47.37, 8.54, 0.4), (46.20, 6.14, 0.25), (45.46, 9.19, 0.2), (10.0, -150.0, 0.1),
                        (48.86, 2.35, 0.05)])  # Zurich, Geneva, Milan, the mid-Pacific, Paris
    shares, water = answers.country_shares(result)
    assert dict(shares) == pytest.approx({"Switzerland": 0.65, "Italy": 0.2, "North Pacific Ocean": 0.1,
                                          "France": 0.05})
    assert [name for name, _ in shares] == ["Switzerland", "Italy", "North Pacific Ocean", "France"]
    assert water == {"North Pacific Ocean"}


def test_phrases_name_the_country_or_sea_and_a_town_only_when_near():
    zurich, sahara, pacific, pole, adriatic = nearest_places([47.3769, 23.0, 0.5, -89.5, 42.5],
                                                             [8.5417, 10.0, -150.0, 30.0, 16.0])
    assert zurich["name"].endswith(", Switzerland") and zurich["km"] < 25 and zurich["country"] == "Switzerland"
    assert sahara["name"] == "Algeria" and sahara["km"] > 100  # no "312 km from ..."
    assert pacific["name"] == "North Pacific Ocean" and pacific["water"] and pacific["country"] is None
    assert pole["name"] == "Antarctica" and pole["country"] == "Antarctica"
    assert adriatic["name"].startswith("Adriatic Sea")
    assert [answers.format_percent(p) for p in (0.62, 0.081, 0.0045, 0.00004, 1.0)] == [
        "62%", "8.1%", "0.45%", "<0.1%", "100%"]
    assert answers.format_coordinates(-33.8688, 151.2093) == "33.87° S, 151.21° E"


def test_answer_downloads_round_trip():
    result = result_at([(47.37, 8.54, 0.6), (45.46, 9.19, 0.3), (48.86, 2.35, 0.1)], top_k=3)
    shares, water = answers.country_shares(result)
    answer = answers.Answer(result, "m", "your photo", ["Zurich, Switzerland", "Milan, Italy", "Paris, France"],
                            shares, answers.Truth("Zurich", 47.3769, 8.5417), water=water)
    rows = list(csv.DictReader(io.StringIO(answer.to_csv())))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    np.testing.assert_allclose([[float(r["latitude"]), float(r["longitude"]), float(r["probability"])]
                                for r in rows], result.uncertainty, atol=1e-6)
    features = json.loads(answer.to_geojson())["features"]
    assert [f["geometry"]["coordinates"] for f in features[:3]] == [[8.54, 47.37], [9.19, 45.46], [2.35, 48.86]]
    assert features[3]["properties"]["true_location"] == "Zurich"
    assert features[3]["properties"]["error_km"] == pytest.approx(
        geodesic_distance_km([47.3769], [8.5417], [47.37], [8.54])[0])


# -------------------------------------------------------------------------------------- page (functions)
def test_view_zooms_to_the_answer_the_world_when_spread_and_across_the_antimeridian():
    x_range, y_range, world = page.view_ranges([46.5, 46.0, 46.8], [9.5, 8.5, 10.0], 0.0)
    assert not world and x_range[0] < 8.5 and x_range[1] > 10.0 and y_range[0] < 46.0 and y_range[1] > 46.8
    assert x_range[1] - x_range[0] == pytest.approx(page.MIN_SPAN[0])  # the tightest view, centred on the pins
    x_range, y_range, world = page.view_ranges([46.5, -33.9], [9.5, 151.2], 0.0)
    assert world and x_range == [-180, 180] and y_range[0] <= -58
    longitudes = [179.0, -178.5, 177.2]  # Fiji: one view across the antimeridian
    centre = page.frame_centre(longitudes)
    xs = page.wrap_longitudes(longitudes, centre)
    x_range, _, world = page.view_ranges([-17.8, -16.5, -18.1], xs, centre)
    assert centre == 179.0 and not world and x_range[0] < 177.2 < 181.5 < x_range[1]
    assert page.frame_centre([9.5, 151.2]) == 0.0


def test_cell_outline_follows_the_s2_cell():
    token = s2.S2CellId(s2.S2LatLng.FromDegrees(46.5, 9.5)).parent(6).ToToken()
    latitudes, longitudes = page.cell_outline(token)
    cell = s2.S2Cell(s2.S2CellId.FromToken(token))
    corners = [s2.S2LatLng(cell.GetVertex(k)) for k in range(4)]
    for corner in corners:  # every corner is on the outline, which is closed
        assert np.min(np.hypot(latitudes - corner.lat().degrees(), longitudes - corner.lng().degrees())) < 1e-9
    assert (latitudes[0], longitudes[0]) == (latitudes[-1], longitudes[-1])
    for lat, lon in zip(latitudes, longitudes):  # points along the edges are on the cell's boundary
        assert cell.GetBoundaryDistance(s2.S2LatLng.FromDegrees(lat, lon).ToPoint()).degrees() < 1e-6
    _, longitudes = page.cell_outline(s2.S2CellId(s2.S2LatLng.FromDegrees(-17, 180)).parent(4).ToToken())
    assert np.ptp(longitudes) < 20  # continuous across the antimeridian


def decode_data_url(url: str) -> bytes:
    header, data = url.split(",", 1)
    return base64.b64decode(data) if header.endswith(";base64") else urllib.parse.unquote(data).encode()


def test_heat_layer_peaks_where_the_probability_is():
    rng = np.random.default_rng(0)
    points = sample_points(2000, rng)
    probabilities = np.exp(-((points[:, 0] + 20) ** 2 + (points[:, 1] - 130) ** 2) / 50)  # around (-20, 130)
    layer = page.heat_layer(np.column_stack([points, probabilities / probabilities.sum()]), 0.0)
    alpha = np.asarray(Image.open(io.BytesIO(decode_data_url(layer["source"]))))[..., 3]
    row, column = np.unravel_index(alpha.argmax(), alpha.shape)
    longitude = layer["x"] + (column + 0.5) * layer["sizex"] / alpha.shape[1]
    latitude = layer["y"] - (row + 0.5) * layer["sizey"] / alpha.shape[0]
    assert abs(latitude + 20) < 4 and abs(longitude - 130) < 4
    assert alpha[0, 0] == 0  # transparent where there is no probability


def test_pins_and_their_labels_are_placed_apart_on_the_smallest_map():
    """Five guesses within a few km (one spot on the map): each pin is moved aside until it covers no other,
    and each label covers no pin and no other label, at the phone's map size."""
    x_range, y_range, world = page.view_ranges([46.50, 46.52, 46.49, 46.51, 46.53], [9.50] * 5, 0.0)
    screen = page.Screen(x_range, y_range, world)
    spots = page.place_pins(screen, [9.50, 9.51, 9.49, 9.50, 9.52], [46.50, 46.52, 46.49, 46.51, 46.53])
    circles = list(screen.circles)
    for i, (x, y, r) in enumerate(circles):
        for (x2, y2, r2) in circles[i + 1:]:
            assert np.hypot(x - x2, y - y2) >= r + r2 - 1e-6
    labels = [page.place_label([screen], spot, page.PIN_RADIUS[1], f"{rank} · Vicosoprano", page.LABEL_FONT)
              for rank, spot in enumerate(spots, 1)]
    assert sum(label is not None for label in labels) >= 4
    boxes = screen.boxes[1:]
    for i, box in enumerate(boxes):
        assert not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes[i + 1:])
        assert not any(page._box_hits_circle(box, x, y, r) for x, y, r in circles)


def test_map_lines_and_country_names_come_with_the_package():
    lines = page.line_traces([0.0, 12.0], [40.0, 50.0], 0.0)
    assert [trace.name for trace in lines] == ["borders", "coast"]
    coast = lines[1]
    assert 1000 < len(coast.x) < 20_000  # detailed near the view, coarse elsewhere: about 100 kB per answer
    near = (coast.x > -5) & (coast.x < 20) & (coast.y > 35) & (coast.y < 55)
    assert near.sum() > 1000
    world = page.empty_map().plot
    assert len(world) < 150_000 and "Russia" in world and "Brazil" in world


def test_scenes_are_shown_only_for_models_trained_with_scene_labels(checkpoints):
    for trained in (True, False):
        model = GeoHierModel.from_pretrained(checkpoints[1], trained_with_scene_labels=trained)
        geolocator = Geolocator(model, tiny_image_processor("geohier"), name="geohier")
        answer = answers.locate(geolocator, image=str(EXAMPLE), top_k=3)
        insight = page.insight_html(answer, geolocator.capabilities.scenes)
        assert ("Scene: " in insight) == trained and insight.count("<img") == 3  # attention either way
        assert len(answer.cells) == model.num_candidates  # every fine cell's token, for the polygons
        fine = model.get_cell_table()[-1]
        best = fine["tokens"].index(answer.cells[int(np.argmax(answer.result.uncertainty[:, 2]))])
        assert (fine["latitudes"][best], fine["longitudes"][best]) == pytest.approx(
            (answer.result.latitudes[0], answer.result.longitudes[0]))


# ------------------------------------------------------------------------------------------- the server
def test_api_lists_the_two_endpoints_without_server_paths(client, served_models):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/geolocate_image", "/geolocate_text"}
    for name, first in (("/geolocate_image", "image"), ("/geolocate_text", "text")):
        parameters = endpoints[name]["parameters"]
        assert [p["parameter_name"] for p in parameters] == [first, "top_k", "model_name"]
        assert parameters[2]["parameter_default"] == model_names()[0]  # the first model is the default
        assert str(served_models[1].parent) not in json.dumps(endpoints)


def check_against_reference(answer: dict, expected: GeolocationResult, top_k: int) -> None:
    """The API's answer is the adapter's, with places, a distribution and the country roll-up."""
    predictions = answer["predictions"]
    assert len(predictions) == top_k
    np.testing.assert_allclose([[p["latitude"], p["longitude"], p["probability"]] for p in predictions],
                               np.column_stack([expected.latitudes, expected.longitudes, expected.probabilities]),
                               rtol=1e-5, atol=1e-6)
    assert all(p["place"] and p["name"] and p["area"] and p["km"] >= 0 and p["phrase"] for p in predictions)
    uncertainty = np.array(answer["uncertainty"])
    assert uncertainty[:, 2].sum() == pytest.approx(1, abs=1e-3)  # all candidates: a distribution
    assert uncertainty[:, 2].max() == pytest.approx(predictions[0]["probability"])
    countries = {c["country"]: c["probability"] for c in answer["countries"]}
    assert sum(countries.values()) == pytest.approx(uncertainty[:, 2].sum())
    assert list(countries.values()) == sorted(countries.values(), reverse=True)


def test_image_endpoint_answers_as_the_adapter_does(client, reference):
    answer = client.predict(handle_file(EXAMPLE), 5, api_name="/geolocate_image")
    [expected] = reference[0].locate_images([EXAMPLE], 5)
    check_against_reference(answer, expected, 5)
    assert answer["model"] == model_names()[0] and "scenes" not in answer and "attention" not in answer


def test_text_endpoint_answers_as_the_adapter_does(client, reference):
    answer = client.predict("a beach with palm trees and volcanic rock", 3, api_name="/geolocate_text")
    [expected] = reference[0].locate_texts(["a beach with palm trees and volcanic rock"], 3)
    check_against_reference(answer, expected, 3)


def test_geohier_answers_with_scenes_attention_and_all_cells(client, reference):
    answer = client.predict(handle_file(EXAMPLE), 4, model_names()[1], api_name="/geolocate_image")
    [expected] = reference[1].locate_images([EXAMPLE], 4)
    check_against_reference(answer, expected, 4)
    assert len(answer["uncertainty"]) == reference[1].model.num_candidates
    assert sorted(answer["scenes"]) == ["scene 0", "scene 1", "scene 2", "scene 3"]
    assert [level["caption"] for level in answer["attention"]] == [
        "level 1 of 3 (coarsest)", "level 2 of 3 (middle)", "level 3 of 3 (finest)"]
    with pytest.raises(AppError, match="The model geohier reads images only"):
        client.predict("a beach", 3, model_names()[1], api_name="/geolocate_text")


def write_huge_png(path: Path) -> Path:
    """A 12000 x 12000 PNG (144 Mpx, above the 89 Mpx limit) that is only ~150 kB on disk."""
    Image.new("L", (12000, 12000)).save(path)
    return path


def write_thin_png(path: Path) -> Path:
    """8 x 4M pixels (32 Mpx, within the pixel limit): resizing its short edge to the processor's size would
    make hundreds of megapixels."""
    Image.new("L", (8, 4_000_000)).save(path)
    return path


BAD_INPUTS = {
    "empty text": (lambda c, tmp: c.predict("   ", 5, api_name="/geolocate_text"), "The text is empty"),
    "long text": (lambda c, tmp: c.predict("x" * 301, 5, api_name="/geolocate_text"),
                  r"The text is too long \(301 characters\)"),
    "text over the token window": (lambda c, tmp: c.predict("y" * 200, 5, api_name="/geolocate_text"),
                                   r"too long for this model \(\d+ tokens, it reads at most 77\)"),
    "not an image": (lambda c, tmp: c.predict(handle_file(tmp / "notes.png"), 5, api_name="/geolocate_image"),
                     r"'notes.png' is not an image file"),
    "huge image": (lambda c, tmp: c.predict(handle_file(write_huge_png(tmp / "huge.png")), 5,
                                            api_name="/geolocate_image"), r"'huge.png' is too large"),
    "thin image": (lambda c, tmp: c.predict(handle_file(write_thin_png(tmp / "thin.png")), 5,
                                            api_name="/geolocate_image"),
                   r"'thin.png' is too elongated: 8x4000000 would be resized to \d+ pixels"),
    "top_k 0": (lambda c, tmp: c.predict("a beach", 0, api_name="/geolocate_text"),
                r"top_k must be a whole number from 1 to 20, got 0"),
    "top_k text": (lambda c, tmp: c.predict("a beach", "five", api_name="/geolocate_text"),
                   r"top_k must be a whole number from 1 to 20, got 'five'"),
    "top_k empty": (lambda c, tmp: c.predict("a beach", "", api_name="/geolocate_text"),
                    r"top_k must be a whole number from 1 to 20, got ''"),
    "top_k fraction": (lambda c, tmp: c.predict("a beach", 2.5, api_name="/geolocate_text"),
                       r"top_k must be a whole number from 1 to 20, got 2.5"),
    "unknown model": (lambda c, tmp: c.predict("a beach", 3, "/srv/models/x", api_name="/geolocate_text"),
                      r"Unknown model '/srv/models/x': choose one of"),
    # Gradio shows error messages as HTML: what a visitor typed comes back escaped, never as markup
    "model with markup": (lambda c, tmp: c.predict("a beach", 3, "<img src=x onerror=alert(1)>",
                                                   api_name="/geolocate_text"),
                          r"Unknown model '&lt;img src=x onerror=alert\(1\)&gt;'"),
    "top_k with markup": (lambda c, tmp: c.predict("a beach", "<b>5</b>", api_name="/geolocate_text"),
                          r"got '&lt;b&gt;5&lt;/b&gt;'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_give_readable_errors_and_no_server_traceback(server, client, tmp_path, case):
    (tmp_path / "notes.png").write_text("this is a text file, not a picture")
    call, message = BAD_INPUTS[case]
    logged = len(server.log_text())
    with pytest.raises(AppError, match=message) as error:
        call(client, tmp_path)
    assert "Traceback" not in str(error.value) and str(server.uploads) not in str(error.value)
    time.sleep(0.3)
    assert "Traceback" not in server.log_text()[logged:]


def test_upload_over_the_file_size_limit_is_refused(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(big), 5, api_name="/geolocate_image")


def test_twenty_concurrent_clients_of_both_models_all_succeed(server):
    def one_user(i):
        client = Client(server.url, verbose=False)
        if i % 3 == 0:
            return client.predict(f"mountains {i}", 3, api_name="/geolocate_text")
        model = model_names()[i % 3 - 1]  # GeoHier with its attention maps, or GeoCLIP
        return client.predict(handle_file(EXAMPLE), 3, model, api_name="/geolocate_image")

    for _ in range(2):
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers_ = list(pool.map(one_user, range(20)))
        assert [len(answer["predictions"]) for answer in answers_] == [3] * 20
        assert sum("attention" in answer for answer in answers_) == 6
    assert "Traceback" not in server.log_text()


def test_one_client_queues_fairly_and_cannot_hold_the_others_up(server):
    """A client that sends many requests at once gets them all answered, one after the other (none refused);
    another client, arriving after them, is served in its turn, before the greedy client's last answer."""
    greedy = Client(server.url, verbose=False)
    jobs = [greedy.submit(handle_file(EXAMPLE), 3, api_name="/geolocate_image") for _ in range(10)]
    finished = []

    def answered(job):
        result = job.result(timeout=180)
        finished.append(time.monotonic())
        return len(result["predictions"])

    with ThreadPoolExecutor(max_workers=10) as pool:
        counts = pool.map(answered, jobs)
        time.sleep(0.3)
        other = Client(server.url, verbose=False).predict("a glacier", 3, api_name="/geolocate_text")
        other_done = time.monotonic()
        assert list(counts) == [3] * 10  # all answered, none refused
    assert len(other["predictions"]) == 3
    assert other_done < max(finished), "the other client waited for all of the greedy client's requests"
    assert "Traceback" not in server.log_text()


def test_uploads_are_deleted_after_their_lifetime(served_models, tmp_path):
    space = SpaceServer(served_models[:1], tmp_path, GEOLOC_SPACE_FILE_LIFETIME="2")
    try:
        photo = tmp_path / "my-holiday-photo.png"
        shutil.copy(EXAMPLE, photo)
        assert Client(space.url, verbose=False).predict(handle_file(photo), 3, api_name="/geolocate_image")
        uploaded = list(space.uploads.rglob("my-holiday-photo.png"))
        assert uploaded, "the upload should be in the upload folder while it is used"
        deadline = time.monotonic() + 30
        while any(path.exists() for path in uploaded) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(path.exists() for path in uploaded)
        page_config = json.loads(urllib.request.urlopen(space.url + "config", timeout=10).read())
        gallery = next(c for c in page_config["components"] if c["props"].get("elem_id") == "examples")
        for item in gallery["props"]["value"]:  # the example thumbnails stay
            assert Path(item["image"]["path"]).is_file()
    finally:
        space.stop()


# ------------------------------------------------------------------------------------------- the browser
@contextmanager
def browser_pages(tmp_path: Path):
    """A headless Chromium that records requests leaving the machine; `new_page(**context_options)` opens pages.
    When the test fails, every open page is saved as a screenshot in `tmp_path` (the path is printed)."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    outside, pages = [], []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

        def new_page(**options):
            context = browser.new_context(**options)
            page_ = context.new_page()
            page_.on("request", lambda r: outside.append(r.url) if OFF_MACHINE.match(r.url) else None)
            pages.append(page_)
            return page_

        try:
            yield new_page, outside
        except BaseException:
            for number, page_ in enumerate(pages):
                if not page_.is_closed():
                    page_.screenshot(path=tmp_path / f"failure-{number}.png", full_page=True)
            print(f"screenshots of the failing pages: {tmp_path}")
            raise
        finally:
            browser.close()


READY = "document.querySelector('#world-map .js-plotly-plot') !== null"
ANSWERED = ("document.querySelector('#answer-summary:not(.empty)') !== null && "
            "document.querySelectorAll('#world-map .scatterlayer .point').length > 0")


def plotted(page_) -> dict:
    """The map as plotly drew it: trace names, texts and points, the axis ranges after the aspect constraint,
    and the layout images' sources."""
    return page_.evaluate("""() => {
        const gd = document.querySelector('#world-map .js-plotly-plot');
        const list = (values) => Array.from(values || []);
        return {traces: gd._fullData.map(t => ({name: t.name, text: list(t.text), x: list(t.x), y: list(t.y),
                                           fill: t.fill || null})),
                x: gd._fullLayout.xaxis.range, y: gd._fullLayout.yaxis.range,
                images: gd.layout.images.map(i => i.source.slice(0, 40))};
    }""")


def table_rows(page_) -> list[str]:
    return page_.locator("#top-k-table tbody tr").all_inner_texts()


def wait_for_new_answer(page_, previous: str | None = None, timeout: float = 60_000):
    page_.wait_for_function(ANSWERED, timeout=timeout)
    if previous is not None:
        page_.wait_for_function("(before) => document.querySelector('#answer-summary').innerText !== before",
                                arg=previous, timeout=timeout)


@needs_chromium
def test_page_shows_the_ranked_answer_zoomed_shareable_and_keeps_it_on_errors(server, reference, tmp_path):
    with browser_pages(tmp_path) as (new_page, outside):
        desktop = new_page(viewport={"width": 1280, "height": 900})
        started = time.monotonic()
        desktop.goto(server.url)
        desktop.wait_for_function(READY, timeout=60_000)
        ready_s = time.monotonic() - started
        assert "Models:" in desktop.locator("#model-banner").inner_text()

        # First answer in a fresh page: an example, with its true location and the error in km.
        started = time.monotonic()
        desktop.locator("#examples .thumbnail-item").nth(5).click()  # Alps
        wait_for_new_answer(desktop)
        first_answer_s = time.monotonic() - started
        print(f"\nfirst answer in a fresh page: {first_answer_s:.2f} s after the click (page ready in "
              f"{ready_s:.2f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        [expected] = reference[0].locate_images([EXAMPLE], 5, places=True)
        summary = desktop.locator("#answer-summary").inner_text()
        assert re.search(r"Best guess: .+ within [\d,]+ km: \d+(\.\d+)?%", summary)  # calibrated (trust.py)
        assert "True location: Alps (46.50° N, 9.50° E)" in summary
        error_km = geodesic_distance_km([46.5], [9.5], expected.latitudes[:1], expected.longitudes[:1])[0]
        assert f"the best guess is {error_km:,.0f} km away" in summary

        # Ranked, labelled pins with the best drawn last (on top), a legend, the base map by URL.
        figure = plotted(desktop)
        names = [trace["name"] for trace in figure["traces"]]
        assert names.index("Guesses 2–5") < names.index("Best guess") < names.index("True location")
        pins = {t["name"]: t for t in figure["traces"]}
        assert pins["Best guess"]["text"] == ["1"] and pins["Guesses 2–5"]["text"] == ["5", "4", "3", "2"]
        spots = np.column_stack([pins["Best guess"]["x"] + pins["Guesses 2–5"]["x"][::-1],
                                 pins["Best guess"]["y"] + pins["Guesses 2–5"]["y"][::-1]])
        guesses = np.column_stack([expected.longitudes, expected.latitudes])
        moved = pins.get("moved-pins", {"x": [], "y": []})  # a pin moved aside has a line from its guess
        leaders = {(round(x, 3), round(y, 3)) for x, y in zip(moved["x"], moved["y"]) if x is not None}
        for spot, guess in zip(spots, guesses):
            assert np.allclose(spot, guess, atol=1e-4) or (round(guess[0], 3), round(guess[1], 3)) in leaders
        legend = desktop.locator("#world-map .legend").text_content()
        assert "Best guess" in legend and "True location" in legend and "Probability" in legend
        assert figure["images"][0].startswith("gradio_api/file=") and figure["images"][3].startswith("data:image/png")
        assert all(not source.startswith("data:image/jpeg") for source in figure["images"])  # no map resent

        # Zoomed to the answer: every pin and the true location in view; not the whole world unless spread.
        markers = [pins[name] for name in ("Best guess", "Guesses 2–5", "True location")]
        xs, ys = [x for t in markers for x in t["x"]], [y for t in markers for y in t["y"]]
        assert figure["x"][0] < min(xs) and max(xs) < figure["x"][1]
        assert figure["y"][0] < min(ys) and max(ys) < figure["y"][1]
        spread = max(xs) - min(xs) > page.WORLD_SPAN[0] or max(ys) - min(ys) > page.WORLD_SPAN[1]
        assert spread or figure["x"][1] - figure["x"][0] < 300

        # The table: ranks, places, percentages, no wrapped headers; the country roll-up; downloads.
        rows = table_rows(desktop)
        assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
        assert all(row.strip().endswith("Open in OpenStreetMap") for row in rows)
        assert all(re.search(r"(\d+(\.\d+)?|<0\.1)%\s+Open in OpenStreetMap$", row.strip()) for row in rows)
        osm = desktop.locator("#top-k-table td.osm a").evaluate_all("links => links.map(a => a.href)")
        assert len(osm) == 5 and all(url.startswith("https://www.openstreetmap.org/?mlat=") for url in osm)
        heights = desktop.locator("#top-k-table th").evaluate_all("cells => cells.map(c => c.clientHeight)")
        assert max(heights) < 1.6 * min(heights) and max(heights) < 40, f"headers wrap: {heights}"
        assert desktop.locator("#countries").inner_text().startswith("By country or sea: ")
        csv_rows = list(csv.DictReader(io.StringIO(decode_data_url(
            desktop.locator("#download-csv").get_attribute("href")).decode())))
        np.testing.assert_allclose([[float(r["latitude"]), float(r["longitude"])] for r in csv_rows],
                                   np.column_stack([expected.latitudes, expected.longitudes]), atol=1e-5)
        geojson = json.loads(decode_data_url(desktop.locator("#download-geojson").get_attribute("href")))
        assert len(geojson["features"]) == 6  # five guesses and the true location
        assert desktop.locator("#answer-summary").bounding_box()["y"] < 300  # the answer is above the fold

        # The share link reproduces the answer in a fresh page.
        link = desktop.locator("#share-link").evaluate("a => a.href")
        assert urllib.parse.parse_qs(urllib.parse.urlparse(link).query) == {"example": ["alps"], "k": ["5"]}
        shared = new_page(viewport={"width": 1280, "height": 900})
        shared.goto(link)
        wait_for_new_answer(shared)
        assert table_rows(shared) == rows
        assert shared.locator("#answer-summary").inner_text() == summary

        # An upload is located at once; its share link (an id) reproduces it too.
        photo = tmp_path / "holiday.png"
        shutil.copy(SPACE / "examples" / "sahara.png", photo)
        desktop.locator("#photo input[type=file]").set_input_files(photo)
        wait_for_new_answer(desktop, summary)
        uploaded_rows, uploaded_summary = table_rows(desktop), desktop.locator("#answer-summary").inner_text()
        assert "your photo" in uploaded_summary and "True location" not in uploaded_summary
        link = desktop.locator("#share-link").evaluate("a => a.href")
        assert "shared=" in link
        assert "not your photo" in desktop.locator("#share-note").inner_text()
        shared.goto(link)
        wait_for_new_answer(shared)
        assert table_rows(shared) == uploaded_rows
        assert "the photo itself is not shared" in shared.locator("#answer-summary").inner_text()

        # Errors leave the previous answer in place: a file that is not an image (removed from the photo box),
        # an empty description (when a served model reads text: the bundled one declares it cannot).
        (tmp_path / "notes.png").write_text("not a picture")
        desktop.locator("#photo input[type=file]").set_input_files(tmp_path / "notes.png")
        desktop.get_by_text("'notes.png' is not an image file").wait_for(timeout=30_000)
        assert desktop.locator("#photo img").count() == 0
        if any(g.capabilities.text and g.capabilities.text_aligned for g in reference):
            desktop.get_by_role("tab", name="Description").click()
            desktop.locator("#locate-text").click()
            desktop.get_by_text("The text is empty").wait_for(timeout=30_000)
        else:
            assert desktop.get_by_role("tab", name="Description").count() == 0  # text mode hidden
        assert table_rows(desktop) == uploaded_rows
        assert desktop.locator("#answer-summary").inner_text() == uploaded_summary

        # A share link naming an unknown example says so.
        shared.goto(server.url + "?example=atlantis")
        shared.get_by_text("Unknown example 'atlantis'").wait_for(timeout=30_000)
    assert outside == [], f"the page fetched from outside the machine: {outside}"


@needs_chromium
def test_geohier_page_shows_cells_scenes_and_attention_and_no_text_tab(server, tmp_path):
    with browser_pages(tmp_path) as (new_page, outside):
        desktop = new_page(viewport={"width": 1280, "height": 900})
        desktop.goto(server.url + "?" + urllib.parse.urlencode({"example": "sahara", "k": 3,
                                                                 "model": model_names()[1]}))
        wait_for_new_answer(desktop)
        figure = plotted(desktop)
        assert any(trace["fill"] == "toself" for trace in figure["traces"])  # the predicted cells
        assert "Predicted cells" in desktop.locator("#world-map .legend").text_content()
        assert len(table_rows(desktop)) == 3
        insight = desktop.locator("#model-insight")
        assert insight.locator(".scenes").inner_text().startswith("Scene: ")
        assert insight.locator("figure img").count() == 3
        description = desktop.get_by_role("tab", name="Description")  # GeoHier reads no text: disabled or hidden
        assert description.count() == 0 or description.is_disabled()
    assert outside == []


BEACON = "http://beacon.invalid"  # never resolves: a request for it would still be recorded as leaving
HOSTILE_LINKS = {
    "example": {"example": f'<img src="{BEACON}/example.png"><a id="phish" href="{BEACON}/login">Session '
                           'expired: click here to log in</a>'},
    "model": {"example": "alps", "model": f'<img src="{BEACON}/model.png"><a id="phish" href="{BEACON}">x</a>'},
    "k": {"example": "alps", "k": f'<img src="{BEACON}/k.png"><a id="phish" href="{BEACON}">x</a>'},
}


@needs_chromium
def test_hostile_share_links_render_no_markup_and_send_no_request(server, tmp_path):
    """Issue 23: `?example=<img src=beacon><a href=...>` was echoed into the error pop-up and rendered (the browser
    requested the beacon). Every echoed value is escaped: the text shows, no element from it exists."""
    with browser_pages(tmp_path) as (new_page, outside):
        page_ = new_page(viewport={"width": 1280, "height": 900})
        for name, params in HOSTILE_LINKS.items():
            page_.goto(server.url + "?" + urllib.parse.urlencode(params))
            page_.wait_for_function("document.body.innerText.includes('beacon.invalid')", timeout=60_000)
            page_.wait_for_timeout(500)  # an injected <img> would have started loading by now
            injected = page_.locator("img[src*='beacon'], a[href*='beacon'], #phish").count()
            assert injected == 0, f"?{name}=: {injected} element(s) from the link were rendered"
    assert not [url for url in outside if "beacon" in url] and outside == [], outside


@needs_chromium
def test_phone_shows_the_answer_at_the_top_after_the_click(server, tmp_path):
    with browser_pages(tmp_path) as (new_page, outside):
        phone = new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        phone.goto(server.url)
        phone.wait_for_function(READY, timeout=60_000)
        assert phone.locator("#photo").bounding_box()["y"] < phone.locator("#results-column").bounding_box()["y"]
        example = phone.locator("#examples .thumbnail-item").first
        example.scroll_into_view_if_needed()
        example.tap()
        wait_for_new_answer(phone)
        phone.wait_for_timeout(1000)  # the smooth scroll to the answer
        summary = phone.locator("#answer-summary").bounding_box()
        assert 0 <= summary["y"] < 200, f"the answer is not at the top of the screen: {summary}"
        assert phone.locator("#results-column").bounding_box()["y"] < phone.locator("#photo").bounding_box()["y"]
        assert phone.locator("#world-map .js-plotly-plot").bounding_box()["width"] <= 390
    assert outside == []


MAP_SHAPES = """() => {
    const gd = document.querySelector('#world-map .js-plotly-plot');
    const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    const traces = Array.from(gd.querySelectorAll('.scatterlayer > .trace'));
    const named = name => traces.filter((t, i) => gd._fullData[i] && gd._fullData[i].name.startsWith(name));
    const pins = ['Best guess', 'Guesses', 'True location'].flatMap(
        name => named(name).flatMap(t => Array.from(t.querySelectorAll('.point')).map(box)));
    return {labels: Array.from(gd.querySelectorAll('.annotation-text-g')).map(e => [e.textContent, box(e)]),
            pins: pins, countries: named('country names').flatMap(t => Array.from(t.querySelectorAll('.textpoint text'))
                .map(e => [e.textContent, box(e)]))};
}"""


def boxes_overlap(a, b, slack: float = 1.0) -> bool:
    return a[0] + slack < b[2] and b[0] + slack < a[2] and a[1] + slack < b[3] and b[1] + slack < a[3]


def box_covers_pin(box, pin, slack: float = 1.0) -> bool:
    """Whether a text box covers part of a round pin (given by its bounding square)."""
    x, y, radius = (pin[0] + pin[2]) / 2, (pin[1] + pin[3]) / 2, (pin[2] - pin[0]) / 2
    nearest_x, nearest_y = min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3])
    return np.hypot(x - nearest_x, y - nearest_y) < radius - slack


def check_map_shapes(page_) -> dict:
    """Every pin numbered and named, and no name covering a pin or another name (bounding boxes)."""
    shapes = page_.evaluate(MAP_SHAPES)
    labels = [box for _, box in shapes["labels"]]
    texts = labels + [box for _, box in shapes["countries"]]
    for i, box in enumerate(texts):
        assert not any(boxes_overlap(box, other) for other in texts[i + 1:]), f"names overlap: {shapes}"
        assert not any(box_covers_pin(box, pin) for pin in shapes["pins"]), f"a name covers a pin: {shapes}"
    return shapes


def coast_pixels(png: bytes) -> int:
    """How many pixels of a screenshot have the coastlines' colour (dark slate blue, antialiased)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    target = np.array([int(page.COAST_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - target).sum(axis=2) < 60).sum())


@needs_chromium
def test_map_has_coastlines_named_pins_no_overlaps_one_story_and_phone_tap_targets(server, tmp_path):
    """What a visitor sees (issue 21): coastlines on the base map (pixels), every pin numbered and named
    without covering another (bounding boxes) at 1280x900 and on a 390 px phone, pin 1 named as the answer's
    best guess, a model switch that answers again with the new model, and on the phone no toolbar over the
    map, tap targets of 44 px or more and a way back to the inputs."""
    with browser_pages(tmp_path) as (new_page, outside):
        desktop = new_page(viewport={"width": 1280, "height": 900})
        desktop.goto(server.url)
        desktop.wait_for_function(READY, timeout=60_000)
        desktop.wait_for_timeout(300)
        empty = coast_pixels(desktop.locator("#world-map").screenshot())
        assert empty > 3000, f"no coastlines on the world map ({empty} pixels of their colour)"
        assert "Russia" in desktop.locator("#world-map").inner_text()  # country names

        desktop.goto(server.url + "?example=alps&k=5")
        wait_for_new_answer(desktop)
        shapes = check_map_shapes(desktop)
        assert sorted(text.split(" · ")[0] for text, _ in shapes["labels"]) == ["1", "2", "3", "4", "5"]
        pin_one = next(text for text, _ in shapes["labels"] if text.startswith("1 · "))[len("1 · "):]
        best_line = desktop.locator("#answer-summary .sub").first.inner_text()
        first_row = table_rows(desktop)[0]
        assert pin_one in first_row and pin_one in best_line, (pin_one, best_line, first_row)
        assert coast_pixels(desktop.locator("#world-map").screenshot()) > 300

        # Another model: the same example is answered again with it (no old answer under the new name).
        before = desktop.locator("#answer-summary").inner_text()
        desktop.locator("#model input").click()
        desktop.get_by_role("option", name=model_names()[1]).click()
        wait_for_new_answer(desktop, before)
        assert f"model {model_names()[1]}" in desktop.locator("#answer-summary").inner_text()
        check_map_shapes(desktop)

        phone = new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        phone.goto(server.url + "?example=himalaya&k=5")
        wait_for_new_answer(phone)
        shapes = check_map_shapes(phone)
        assert len(shapes["labels"]) >= 4
        assert not phone.locator("#world-map .modebar-container").is_visible()
        targets = phone.locator("#world-map .updatemenu-button, #answer-details .action, #answer-details "
                                ".osm-inline, #back-to-inputs").evaluate_all(
            "elements => elements.map(e => [e.textContent, e.getBoundingClientRect().height])")
        assert len(targets) >= 2 + 4 + 5 + 1 and all(height >= 44 for _, height in targets), targets
        phone.locator("#back-to-inputs").tap()
        phone.wait_for_timeout(1000)
        assert 0 <= phone.locator("#inputs-column").bounding_box()["y"] < 200  # the inputs, on screen again
    assert outside == [], f"the page fetched from outside the machine: {outside}"


# ------------------------------------------------------------------------------------------ geoloc space
def test_geoloc_space_exports_a_clean_self_contained_space(tmp_path, monkeypatch):
    output = tmp_path / "space"
    assert geoloc.hub.space.main([str(output)]) == 0
    for path in ("app.py", "answers.py", "page.py", "README.md", "requirements.txt", "examples/examples.csv",
                 "geoloc/inference/adapter.py", "geoloc/assets/worldmap/README.md", "modeling_geoclip/__init__.py",
                 "modeling_geohier/__init__.py", "geoloc/assets/geoclip-worldmap-tiny/model.safetensors"):
        assert (output / path).is_file(), path
    assert not [p for p in output.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]
    front_matter = (output / "README.md").read_text().split("---")[1]
    for line in ("sdk: gradio", "app_file: app.py", "python_version: \"3.11\""):
        assert line in front_matter.splitlines(), line
    # Run from the folder, the copies next to app.py are what gets imported.
    found = subprocess.run([sys.executable, "-B", "-c", "import answers, page, geoloc; print(geoloc.__file__)"],
                           cwd=output, capture_output=True, text=True, check=True).stdout
    assert Path(found.strip()).resolve() == (output / "geoloc" / "__init__.py").resolve()
    with pytest.raises(ValueError, match="not empty"):
        geoloc.hub.space.export_space(output)
    # Stray files next to the sources (build outputs, caches, editor files) are left behind.
    checkout = tmp_path / "checkout"
    for folder in ("spaces/geolocation", *geoloc.hub.space.PACKAGES):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    strays = ["geoloc/__pycache__/space.cpython-311.pyc", "geoloc/hub/space.py.orig", "geoloc/.DS_Store",
              "spaces/geolocation/.ipynb_checkpoints/app-checkpoint.py", "modeling_geoclip/build.log",
              "spaces/geolocation/flagged/log.jsonl", "geoloc/_native.so"]
    for stray in strays:
        (checkout / stray).parent.mkdir(parents=True, exist_ok=True)
        (checkout / stray).write_text("stray")
    monkeypatch.setattr(geoloc.hub.space, "REPOSITORY", checkout)
    monkeypatch.setattr(geoloc.hub.space, "SPACE_SOURCE", checkout / "spaces" / "geolocation")
    clean = geoloc.hub.space.export_space(tmp_path / "clean")
    exported = {p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file()}
    assert exported == {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}


def requirement_names(lines) -> set[str]:
    return {re.split(r"[\s<>=!~\[;@]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in lines if line.strip() and not line.lstrip().startswith("#")}


WHAT_THE_SPACE_IMPORTS = """
import ast, importlib.metadata, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import app
for name, geolocator in app.GEOLOCATORS.items():  # every path, so that lazy imports happen too
    app.locate(geolocator, image=str(app.EXAMPLES["alps"][0]), top_k=3)
    app.render(app.locate(geolocator, image=str(app.EXAMPLES["alps"][0]), top_k=3), "k=3")
    if geolocator.capabilities.text:
        app.locate(geolocator, text="a beach", top_k=3)
roots = [Path(root).resolve() for root in sys.argv[1:]]
first_party = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)
               and m.__file__.endswith(".py") and any(Path(m.__file__).resolve().is_relative_to(r) for r in roots)]
imported = set()
for path in first_party:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
owners = {}  # top-level module -> the distributions whose files hold it (RECORD, not top_level.txt)
for distribution in importlib.metadata.distributions():
    name = distribution.metadata["Name"]  # parsed on each access: once per distribution, not per file
    for top in {file.parts[0] for file in distribution.files or []}:
        if not top.endswith((".dist-info", ".data")) and top != "..":
            owners.setdefault(top.split(".")[0], set()).add(name)
used = {owner for name in imported if name in sys.modules for owner in owners.get(name, [])}
print(json.dumps(sorted(used)))
"""


def test_space_requirements_are_exactly_what_it_imports(served_models):
    """requirements.txt lists each distribution that the Space's code (app, page, answers and the geoloc and
    modeling modules it loads) imports while it answers with both models, and nothing else (gradio comes
    with the Space SDK)."""
    environment = {**os.environ, "GEOLOC_MODEL": ",".join(map(str, served_models)), "HF_HUB_OFFLINE": "1"}
    roots = [str(SPACE), *(str(REPO / package) for package in geoloc.hub.space.PACKAGES)]
    run = subprocess.run([sys.executable, "-c", WHAT_THE_SPACE_IMPORTS, *roots], env=environment,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    used = requirement_names(json.loads(run.stdout.splitlines()[-1])) - {"gradio", "geoloc"}
    listed = requirement_names((SPACE / "requirements.txt").read_text().splitlines())
    assert listed == used, f"missing: {sorted(used - listed)}, unused: {sorted(listed - used)}"


def test_plotly_is_a_dependency_of_the_space_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "plotly" not in requirement_names(project["dependencies"])
    assert {"gradio", "plotly", "reverse-geocode"} <= requirement_names(project["optional-dependencies"]["space"])
    for package in geoloc.hub.space.PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(name.split(".")[0] == "plotly" for name in names), path
