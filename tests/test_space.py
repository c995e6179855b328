"""The Gradio Space (`spaces/geolocation/app.py`), run as `python app.py` in a subprocess on a free loopback
port with a tiny GeoCLIP and a tiny GeoHier checkpoint: both API endpoints through `gradio_client`, readable
errors for bad inputs, 20 concurrent clients, the page in headless Chromium, the default model, and
`geoloc space` (the folder that is uploaded as the Space)."""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import geoloc.space
from geoloc.configs import TINY_IMAGE_SIZE, tiny_geoclip_config, tiny_geohier_config
from geoloc.geocells import build_geocells
from geoloc.inference import UNCERTAINTY_POINTS
from geoloc.space import NOTES, TABLE_COLUMNS, load_geolocators, locate_image, locate_text, random_tiny_geolocator
from geoloc.worldmap import sample_points
from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel, byte_level_clip_tokenizer
from modeling_geohier import GeoHierModel

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "spaces" / "geolocation"
EXAMPLE = SPACE / "examples" / "alps.png"
GALLERY_SIZE = 1500
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def save_tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    """A tiny GeoCLIP (gallery, processor, tokenizer) and a tiny GeoHier (cell table, processor; declared as
    trained with scene labels, so that the page shows its scenes) on disk."""
    processor = GeoCLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                      crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    geoclip = GeoCLIPModel(tiny_geoclip_config())
    geoclip.set_gallery(sample_points(GALLERY_SIZE, np.random.default_rng(1)))
    points = sample_points(3000, np.random.default_rng(2))
    cells, _ = build_geocells(points[:, 0], points[:, 1], levels=[(5, 400), (5, 150), (5, 60)])
    geohier = GeoHierModel(tiny_geohier_config(cells_per_level=[len(level["tokens"]) for level in cells],
                                               trained_with_scene_labels=True))
    geohier.set_cell_table(cells)
    for name, model in (("geoclip", geoclip), ("geohier", geohier)):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    byte_level_clip_tokenizer().save_pretrained(root / "geoclip")
    return root / "geoclip", root / "geohier"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """`python spaces/geolocation/app.py` with GEOLOC_MODEL naming both tiny checkpoints; yields its URL."""
    port, logs = free_port(), tmp_path_factory.mktemp("server")
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GEOLOC_MODEL": ",".join(map(str, checkpoints)), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(logs / "uploads"), "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}/"
    with open(logs / "app.log", "wb") as log:
        process = subprocess.Popen([sys.executable, str(SPACE / "app.py")], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"The app did not start:\n{(logs / 'app.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def check_table(table: dict, top_k: int) -> np.ndarray:
    """Check the returned top-k table and return its (lat, lon, probability) columns as a (top_k, 3) array."""
    assert table["headers"] == TABLE_COLUMNS
    rows = table["data"]
    assert [row[0] for row in rows] == list(range(1, top_k + 1))
    values = np.array([[row[6], row[7], row[4]] for row in rows], dtype=float)
    assert (np.abs(values[:, 0]) <= 90).all() and (np.abs(values[:, 1]) <= 180).all()
    assert ((values[:, 2] > 0) & (values[:, 2] <= 1)).all()
    assert (np.diff(values[:, 2]) <= 0).all(), "probabilities must be best first"
    for row in rows:
        assert row[1] and row[2] and row[3] >= 0  # nearest place, country, distance to it
        assert [float(x) for x in row[5].split(", ")] == [row[6], row[7]]  # the copyable "lat, lon"
    return values


def traces(figure: dict) -> dict[str, dict[str, np.ndarray]]:
    """The figure's traces by type, with plotly's typed arrays ({"dtype", "bdata"}) decoded to numpy."""
    def decode(value):
        if isinstance(value, dict) and "bdata" in value:
            return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return np.asarray(value) if isinstance(value, list) else value

    return {trace["type"]: {key: decode(value) for key, value in trace.items()}
            for trace in json.loads(figure["plot"])["data"]}


def test_api_lists_the_two_endpoints_with_their_parameters(client, checkpoints):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/geolocate_image", "/geolocate_text"}
    for name, first in (("/geolocate_image", "image"), ("/geolocate_text", "text")):
        parameters = endpoints[name]["parameters"]
        assert [p["parameter_name"] for p in parameters] == [first, "top_k", "model_name"]
        assert parameters[2]["parameter_default"] == str(checkpoints[0])  # the first model is the default


def test_image_endpoint_returns_table_and_map(client):
    table, figure, scenes, attention = client.predict(handle_file(EXAMPLE), 5, api_name="/geolocate_image")
    values = check_table(table, 5)
    plotted = traces(figure)
    np.testing.assert_allclose(plotted["scattermap"]["lat"], values[:, 0], atol=1e-5)
    np.testing.assert_allclose(plotted["scattermap"]["lon"], values[:, 1], atol=1e-5)
    heat = plotted["densitymap"]  # GeoCLIP: the softmax over its whole gallery, all 1500 points drawn
    assert len(heat["z"]) == GALLERY_SIZE
    assert sum(heat["z"]) == pytest.approx(1, abs=1e-3) and max(heat["z"]) == pytest.approx(values[0, 2], 1e-3)
    layout = json.loads(figure["plot"])["layout"]["map"]
    assert layout["style"] == "white-bg" and layout["layers"][0]["source"].startswith("data:image/jpeg;base64,")
    assert not scenes and attention == []  # GeoCLIP has neither


def test_text_endpoint_returns_table_and_map(client):
    table, figure, _, _ = client.predict("a beach with palm trees and volcanic rock", 3, api_name="/geolocate_text")
    values = check_table(table, 3)
    np.testing.assert_allclose(traces(figure)["scattermap"]["lat"], values[:, 0], atol=1e-5)


def test_geohier_adds_the_scene_and_attention_per_level(client, checkpoints):
    geohier = str(checkpoints[1])
    table, figure, scenes, attention = client.predict(handle_file(EXAMPLE), 4, geohier,
                                                      api_name="/geolocate_image")
    values = check_table(table, 4)
    heat = traces(figure)["densitymap"]  # every fine cell at its centroid, with its probability
    assert len(heat["z"]) == GeoHierModel.from_pretrained(geohier).num_candidates
    assert max(heat["z"]) == pytest.approx(values[0, 2], 1e-3)
    assert len(scenes["confidences"]) == 3 and scenes["label"].startswith("scene ")
    assert [item["caption"] for item in attention] == [
        "level 1 of 3 (coarsest)", "level 2 of 3 (middle)", "level 3 of 3 (finest)"]
    assert Image.open(attention[0]["image"]).size == (224, 224)
    with pytest.raises(AppError, match="reads images only"):
        client.predict("a beach", 3, geohier, api_name="/geolocate_text")


def write_huge_png(path: Path) -> Path:
    """A 12000 x 12000 PNG (144 Mpx, above the 89 Mpx limit) that is only ~150 kB on disk."""
    Image.new("L", (12000, 12000)).save(path)
    return path


@pytest.mark.parametrize("case, message", [
    ("empty text", "The text is empty"),
    ("long text", r"The text is too long \(301 characters\)"),
    ("text over the token window", r"too long for this model \(\d+ tokens, it reads at most 77\)"),
    ("not an image", r"'notes.png' is not an image file"),
    ("huge image", r"'huge.png' is too large"),
    ("top_k out of range", "Value 0 is less than minimum value 1"),
])
def test_bad_inputs_give_readable_errors(client, tmp_path, case, message):
    calls = {
        "empty text": lambda: client.predict("   ", 5, api_name="/geolocate_text"),
        "long text": lambda: client.predict("x" * 301, 5, api_name="/geolocate_text"),
        "text over the token window": lambda: client.predict("y" * 200, 5, api_name="/geolocate_text"),
        "not an image": lambda: client.predict(
            handle_file(tmp_path / "notes.png"), 5, api_name="/geolocate_image"),
        "huge image": lambda: client.predict(
            handle_file(write_huge_png(tmp_path / "huge.png")), 5, api_name="/geolocate_image"),
        "top_k out of range": lambda: client.predict("a beach", 0, api_name="/geolocate_text"),
    }
    (tmp_path / "notes.png").write_text("this is a text file, not a picture")
    with pytest.raises(AppError, match=message) as error:
        calls[case]()
    assert "Traceback" not in str(error.value) and "/tmp/" not in str(error.value)


def test_upload_over_the_file_size_limit_is_refused(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(big), 5, api_name="/geolocate_image")


def test_twenty_concurrent_clients_all_succeed(server):
    def one_user(i):
        client = Client(server, verbose=False)
        if i % 2:
            return client.predict(f"mountains {i}", 3, api_name="/geolocate_text")[0]
        return client.predict(handle_file(EXAMPLE), 3, api_name="/geolocate_image")[0]

    with ThreadPoolExecutor(max_workers=20) as pool:
        tables = list(pool.map(one_user, range(20)))
    for table in tables:
        check_table(table, 3)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_page_shows_map_and_table_after_an_example(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    outside = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("request", lambda r: None if re.match(r"(http://127\.0\.0\.1|data:|blob:)", r.url)
                else outside.append(r.url))
        page.goto(server)
        assert "Models:" in page.locator("#model-banner").inner_text()
        page.get_by_text("Alps (46.5, 9.5)").click()
        page.locator("#world-map .maplibregl-canvas").wait_for(timeout=30_000)
        rows = page.locator("#top-k-table [role=row]")  # the header, then one per place
        rows.nth(5).wait_for(timeout=30_000)
        page.wait_for_timeout(1500)  # let MapLibre draw the base map and markers
        page.screenshot(path=tmp_path / "space.png", full_page=True)
        assert rows.count() == 6
        assert re.search(r"-?\d+\.\d{5}, -?\d+\.\d{5}", rows.nth(1).inner_text())
        assert page.locator("#world-map canvas").count() >= 1
        browser.close()
    print(f"screenshot: {tmp_path / 'space.png'}")
    assert outside == [], f"the page fetched from outside the machine: {outside}"


def test_default_model_is_the_bundled_one_or_a_random_tiny_one(monkeypatch, tmp_path):
    monkeypatch.delenv("GEOLOC_MODEL", raising=False)
    (geolocator,), note = load_geolocators()
    bundled = (Path(geoloc.space.BUNDLED_MODEL) / "config.json").is_file()
    assert note == NOTES["bundled" if bundled else "random"]
    monkeypatch.setattr(geoloc.space, "BUNDLED_MODEL", tmp_path / "missing")
    (geolocator,), note = load_geolocators("")
    assert geolocator.name == "random tiny GeoCLIP" and note == NOTES["random"]
    with pytest.raises(ValueError, match="top_k must be between 1 and 20"):
        locate_text(geolocator, "a volcano", top_k=0)
    result = locate_text(geolocator, "a volcano", top_k=2)
    assert result.uncertainty.shape == (UNCERTAINTY_POINTS, 3)  # the 3000 most probable of 4096 gallery points
    np.testing.assert_allclose(result.uncertainty[:2, 2], result.probabilities)
    assert result.scenes is None and result.attention is None


def test_several_models_load_in_the_given_order(checkpoints):
    geolocators, note = load_geolocators(f" {checkpoints[1]} , {checkpoints[0]},")
    assert [g.name for g in geolocators] == [str(checkpoints[1]), str(checkpoints[0])] and note == ""
    assert [g.tokenizer is not None for g in geolocators] == [False, True]
    assert [g.capabilities.attention for g in geolocators] == [True, False]


def test_geoloc_space_exports_a_self_contained_space(tmp_path):
    output = tmp_path / "space"
    assert geoloc.space.main([str(output)]) == 0
    for path in ("app.py", "README.md", "requirements.txt", "examples/examples.csv", "geoloc/space.py",
                 "geoloc/assets/worldmap/README.md", "modeling_geoclip/__init__.py", "modeling_geohier/__init__.py"):
        assert (output / path).is_file(), path
    assert not list(output.rglob("__pycache__"))
    front_matter = (output / "README.md").read_text().split("---")[1]
    for line in ("sdk: gradio", "app_file: app.py", "python_version: \"3.11\""):
        assert line in front_matter.splitlines(), line
    # Run from the folder, the copies next to app.py are what gets imported.
    found = subprocess.run([sys.executable, "-c", "import geoloc.space, modeling_geohier; print(geoloc.__file__)"],
                           cwd=output, capture_output=True, text=True, check=True).stdout
    assert Path(found.strip()).resolve() == (output / "geoloc" / "__init__.py").resolve()
    with pytest.raises(ValueError, match="not empty"):
        geoloc.space.export_space(output)


def requirement_names(lines) -> set[str]:
    return {re.split(r"[\s<>=!~\[;@]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in lines if line.strip() and not line.lstrip().startswith("#")}


def test_space_requirements_cover_the_package_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = requirement_names(project["dependencies"] + project["optional-dependencies"]["space"]) - {"gradio"}
    listed = requirement_names((SPACE / "requirements.txt").read_text().splitlines())
    assert needed <= listed, f"spaces/geolocation/requirements.txt misses {sorted(needed - listed)}"


def test_random_tiny_geolocator_is_reproducible():
    first, second = random_tiny_geolocator(), random_tiny_geolocator()
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    a, b = locate_image(first, image, 3), locate_image(second, image, 3)
    np.testing.assert_array_equal(a.latitudes, b.latitudes)
    assert torch.equal(first.model.gallery_coordinates, second.model.gallery_coordinates)
