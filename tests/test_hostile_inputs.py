"""Hostile and unlucky inputs: files that make Pillow raise odd exceptions, images declaring huge sizes, dataset
paths escaping their folder, corrupted checkpoints, NaN answers. Every fixture is made here; nothing is
downloaded."""

import csv
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from conftest import save_tiny_geoclip
from geoloc import cli
from geoloc.data.benchmarks import load_benchmark
from geoloc.configs import tiny_geoclip_config, tiny_geohier_config, tiny_image_processor
from geoloc.data.dataset import GeoCollator, decode_images, load_geo_dataset
from geo_core import MAX_IMAGE_PIXELS, load_image
from geo_core.integrity import tensor_sha256
from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel
from modeling_geohier import GeoHierModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GALLERY = [[48.8566, 2.3522], [40.7128, -74.006], [-33.8688, 151.2093], [35.6762, 139.6503]]


# ----------------------------------------------------------------------------------------- hostile images
def _encoded(image_format: str, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, image_format)
    return buffer.getvalue()


def truncated_qoi() -> bytes:
    """A QOI file cut after its header: Pillow's decoder raises IndexError."""
    return _encoded("QOI")[:16]


def dds_with_unknown_fourcc() -> bytes:
    """A DDS file whose pixel format names an unknown FourCC: Pillow raises NotImplementedError."""
    data = bytearray(_encoded("DDS"))
    data[80:84] = struct.pack("<I", 4)  # DDPF_FOURCC
    data[84:88] = b"ABCD"
    return bytes(data)


def ppm_with_bad_header() -> bytes:
    """A PPM whose width is not a number: Pillow raises ValueError without naming the file."""
    return b"P6\n1\x123 8\n255\n" + bytes(64 * 3)


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 RGBA PNG whose IHDR (and CRC) is patched to declare width x height pixels."""
    data = bytearray(_encoded_rgba())
    chunk = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = chunk
    data[29:33] = struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


def _encoded_rgba() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (1, 1), (1, 2, 3, 4)).save(buffer, "PNG")
    return buffer.getvalue()


HOSTILE = {"truncated.qoi": (truncated_qoi, IndexError), "fourcc.dds": (dds_with_unknown_fourcc, NotImplementedError),
           "header.ppm": (ppm_with_bad_header, ValueError)}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_every_decoder_failure_is_a_value_error_naming_the_file(name, tmp_path):
    make, raised_by_pillow = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(raised_by_pillow):  # the fixture really is hostile to Pillow itself
        Image.open(path).load()
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        load_image(str(path))
    assert str(path) in str(error.value) and raised_by_pillow.__name__ in str(error.value)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(path.read_bytes())
    images, kept, errors = decode_images([str(path), {"bytes": _encoded("PNG"), "path": None}])
    assert kept == [1] and [position for position, _ in errors] == [0] and str(path) in errors[0][1]


def test_fuzzed_files_only_ever_raise_value_error():
    rng = np.random.default_rng(0)
    originals = [_encoded(image_format, (17, 13)) for image_format in ("PNG", "GIF", "BMP", "QOI", "DDS", "TIFF")]
    for original in originals:
        for _ in range(40):
            data = bytearray(original)
            if rng.random() < 0.4:
                data = data[: rng.integers(1, len(data))]
            else:
                data[rng.integers(len(data))] = int(rng.integers(256))
            try:
                load_image(bytes(data))
            except ValueError:
                pass  # any other exception type fails the test


def test_collator_counts_a_batch_of_unreadable_images(caplog):
    rows = [{"image": {"bytes": make(), "path": None}, "latitude": 1.0, "longitude": 2.0}
            for make, _ in HOSTILE.values()]
    collate = GeoCollator(tiny_image_processor())
    empty = collate(rows)
    assert empty["unreadable"] == 3 and empty["pixel_values"].shape == (0, 3, 32, 32)
    assert empty["locations"].shape == (0, 2)
    good = {"image": {"bytes": _encoded("PNG"), "path": None}, "latitude": 5.0, "longitude": 6.0}
    batches = list(DataLoader([rows[0], good, rows[1]], batch_size=1, collate_fn=collate))
    assert [batch["unreadable"] for batch in batches] == [1, 0, 1] and batches[1]["locations"].tolist() == [[5.0, 6.0]]
    assert "IndexError" in caplog.text and "NotImplementedError" in caplog.text


def test_predict_answers_the_readable_images_and_reports_the_other(tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), "green").save(good)
    bad = tmp_path / "bad.qoi"
    bad.write_bytes(truncated_qoi())
    assert cli.main(["predict", str(good), str(bad), str(good), "--json", "--top-k", "2"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [result["input"] for result in results] == [str(good), str(bad), str(good)]
    assert len(results[0]["predictions"]) == 2 and results[0] == results[2] and results[0]["error"] is None
    assert results[1]["predictions"] == [] and str(bad) in results[1]["error"] and "IndexError" in results[1]["error"]
    [line] = captured.err.strip().splitlines()
    assert line.startswith("geoloc predict: error: ") and str(bad) in line


# ------------------------------------------------------------------------------------------ pixel limit
MEASURE_DECODE = textwrap.dedent("""
    import resource, sys
    from geo_core import load_image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_image(sys.argv[1])
    except ValueError as error:
        print(error)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_an_image_declaring_a_huge_size_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(13000, 13000))  # RGBA: decoding would allocate ~676 MB
    assert Image.open(bomb).size == (13000, 13000) and bomb.stat().st_size < 1000
    result = subprocess.run([sys.executable, "-c", MEASURE_DECODE, str(bomb)], capture_output=True, text=True,
                            check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    message, peak_growth_mb = result.stdout.strip().splitlines()
    assert str(bomb) in message and f"limit of {MAX_IMAGE_PIXELS} pixels" in message and "13000x13000" in message
    assert int(peak_growth_mb) < 50, f"decoding a refused image grew the peak memory by {peak_growth_mb} MB"


def test_the_pixel_limit_is_a_saved_processor_setting(tmp_path):
    processor = GeoCLIPImageProcessor(max_image_pixels=30 * 30, size={"shortest_edge": 8}, crop_size=8)
    processor.save_pretrained(tmp_path)
    loaded = GeoCLIPImageProcessor.from_pretrained(tmp_path)
    assert loaded.max_image_pixels == 900
    assert loaded(np.zeros((30, 30, 3), dtype=np.uint8), return_tensors="pt").pixel_values.shape == (1, 3, 8, 8)
    (tmp_path / "wide.png").write_bytes(_encoded("PNG", (31, 30)))
    with pytest.raises(ValueError, match=r"wide.png' is too large: 31x30 = 930 pixels, above the limit of 900"):
        loaded(str(tmp_path / "wide.png"))
    assert GeoCollator(loaded).limits == {"max_pixels": 900, "resize_edge": 8}
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        GeoCLIPImageProcessor(max_image_pixels=0)


# ----------------------------------------------------------------------------- resize budget, peak memory
MEASURE_PROCESSOR = textwrap.dedent("""
    import json, resource, sys
    from modeling_geoclip import GeoCLIPImageProcessor
    processor = GeoCLIPImageProcessor(**json.loads(sys.argv[2]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        print(processor(sys.argv[1], return_tensors="pt").pixel_values.shape)
    except ValueError as error:
        print(error)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def _processed(path, **processor_options) -> tuple[str, int]:
    """(what the processor printed, growth of the peak memory in MB) in a fresh process."""
    result = subprocess.run([sys.executable, "-c", MEASURE_PROCESSOR, str(path), json.dumps(processor_options)],
                            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    message, peak_growth_mb = result.stdout.strip().splitlines()
    return message, int(peak_growth_mb)


def _save(tmp_path, name, image, **options):
    path = tmp_path / name
    image.save(path, compress_level=1, **options)
    return path


def test_a_thin_image_that_resizing_would_balloon_is_refused_from_its_header(tmp_path):
    """64 x 1048576 = 64 Mpx passes the pixel limit, but its short edge resized to 224 px makes 822 Mpx (the issue
    measured 9.9 GB): refused before decoding."""
    thin = _save(tmp_path, "thin.png", Image.new("L", (64, 1048576)))
    assert thin.stat().st_size < 300_000
    message, growth_mb = _processed(thin)  # CLIP's 224-px processor
    assert message == (f"Image '{thin}' is too elongated: 64x1048576 would be resized to 822083584 pixels (short "
                       f"edge 224), above the limit of {MAX_IMAGE_PIXELS} pixels (max_image_pixels of the image "
                       "processor); aspect ratios up to 1337:1 are allowed.")
    assert growth_mb < 50, f"refusing the thin image grew the peak memory by {growth_mb} MB"
    message, _ = _processed(thin, size={"shortest_edge": 16}, crop_size=16)  # 16 x 262144 = 4 Mpx: fine
    assert message == "torch.Size([1, 3, 16, 16])"


@pytest.mark.parametrize("mode, peak_mb", [("I;16", 600), ("P", 450)])
def test_deep_and_palette_images_of_64_mpx_decode_within_a_bounded_peak(tmp_path, mode, peak_mb):
    """The issue measured 2.2 GB (16-bit) and 1.3 GB (palette) for these; now 512 and 384 MB, of which the RGB
    result takes 192 MB (the processor resizes the PIL image: no full-size numpy copies)."""
    image = Image.new(mode, (8192, 8192))
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 255, 255] * 128)
    path = _save(tmp_path, f"{mode[0]}.png", image)
    del image
    message, growth_mb = _processed(path, size={"shortest_edge": 16}, crop_size=16)
    assert message == "torch.Size([1, 3, 16, 16])"
    assert growth_mb < peak_mb, f"a 64 Mpx {mode} PNG grew the peak memory by {growth_mb} MB"


def ico_hiding_a_huge_png(side: int = 13000) -> bytes:
    """An ICO whose directory says 16x16 while its embedded PNG's header says `side` x `side`."""
    buffer = io.BytesIO()
    Image.new("RGBA", (16, 16)).save(buffer, "ICO", sizes=[(16, 16)])
    data = bytearray(buffer.getvalue())
    ihdr = data.find(b"IHDR")
    chunk = b"IHDR" + struct.pack(">II", side, side) + bytes(data[ihdr + 12 : ihdr + 17])
    data[ihdr : ihdr + 17] = chunk
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


def test_an_ico_whose_directory_lies_is_refused_before_decoding(tmp_path):
    path = tmp_path / "icon.ico"
    path.write_bytes(ico_hiding_a_huge_png())
    assert path.read_bytes()[6:8] == bytes([16, 16])  # the directory entry: 16x16
    result = subprocess.run([sys.executable, "-c", MEASURE_DECODE, str(path)], capture_output=True, text=True,
                            check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    message, growth_mb = result.stdout.strip().splitlines()
    assert message.startswith(f"Image '{path}' is too large: 13000x13000 = 169000000 pixels, above the limit")
    assert int(growth_mb) < 50, f"refusing the ICO grew the peak memory by {growth_mb} MB"


def test_a_processor_config_that_would_balloon_every_image_is_refused_on_load(tmp_path, geoclip_dir):
    config = json.loads((geoclip_dir / "preprocessor_config.json").read_text())
    hostile = _edited_copy(geoclip_dir, tmp_path / "hostile")
    (hostile / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"shortest_edge": 100000}}))
    with pytest.raises(ValueError, match=r"size \{'shortest_edge': 100000\} makes images of 10000000000 pixels"):
        GeoCLIPImageProcessor.from_pretrained(hostile)
    with pytest.raises(ValueError, match=r"crop_size\['height'\] must be a positive integer, got -3"):
        GeoCLIPImageProcessor(crop_size={"height": -3, "width": 8})


def test_a_thin_image_is_one_skipped_image_in_predict_and_training(tmp_path, geoclip_dir, capsys):
    """With the tiny 32-px processor, 4 x 16777216 (64 Mpx) would be resized to 4.3 Gpx."""
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), "green").save(good)
    thin = tmp_path / "thin.png"
    thin.write_bytes(png_declaring(4, 16777216))
    assert cli.main(["predict", str(good), str(thin), "--model", str(geoclip_dir), "--json", "--top-k", "2"]) == 1
    captured = capsys.readouterr()
    first, second = json.loads(captured.out)
    assert len(first["predictions"]) == 2 and first["error"] is None and second["predictions"] == []
    assert "4x16777216 would be resized to 4294967296 pixels (short edge 32)" in second["error"]
    [line] = captured.err.strip().splitlines()
    assert line.startswith("geoloc predict: error: ") and str(thin) in line
    collate = GeoCollator(GeoCLIPImageProcessor.from_pretrained(geoclip_dir))  # what `geoloc train` batches with
    rows = [{"image": {"bytes": None, "path": str(thin)}, "latitude": 1.0, "longitude": 2.0},
            {"image": {"bytes": good.read_bytes(), "path": None}, "latitude": 3.0, "longitude": 4.0}]
    batch = collate(rows)
    assert batch["unreadable"] == 1 and batch["locations"].tolist() == [[3.0, 4.0]]
    data = tmp_path / "data"  # evaluate: scored on the readable image, the thin one counted and listed
    data.mkdir()
    good.rename(data / "good.png")
    thin.rename(data / "thin.png")
    (data / "metadata.csv").write_text("file_name,latitude,longitude\ngood.png,1,2\nthin.png,3,4\n")
    assert cli.main(["evaluate", "--model", str(geoclip_dir), "--dataset", str(data), "--output-dir",
                     str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 1 and metrics["n_unreadable"] == 1
    assert "too elongated" in (tmp_path / "eval" / "predictions.errors.csv").read_text()


# -------------------------------------------------------------------------------------- confined paths
@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "x.png").write_bytes(_encoded("PNG"))
    return secret / "x.png"


def _benchmark_folder(root, ids):
    images = root / "bench" / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(_encoded("PNG"))
    rows = "".join(f"{image_id},10,20\n" for image_id in ids)
    (root / "bench" / "im2gps3k_places365.csv").write_text("IMG_ID,LAT,LON\n" + rows)
    return root / "bench"


@pytest.mark.parametrize("image_id", ["../../secret/x.png", "{absolute}"])
def test_benchmark_ids_outside_the_image_folder_are_refused(tmp_path, outside, image_id):
    image_id = image_id.format(absolute=outside)
    folder = _benchmark_folder(tmp_path, ["a.png", image_id])
    with pytest.raises(ValueError, match=r"row 1: Image path .* is outside the dataset folder") as error:
        load_benchmark("im2gps3k", folder)
    assert image_id in str(error.value)


def test_benchmark_symlinks_leading_outside_are_refused(tmp_path, outside):
    folder = _benchmark_folder(tmp_path, ["a.png", "link.png"])
    (folder / "images" / "link.png").symlink_to(outside)
    with pytest.raises(ValueError, match=r"1 symbolic link\(s\) pointing outside it .*link.png' -> '.*secret/x.png'"):
        load_benchmark("im2gps3k", folder)
    (folder / "images" / "link.png").unlink()
    (folder / "images" / "inside.png").symlink_to(folder / "images" / "a.png")  # inside the folder: fine
    assert load_benchmark("im2gps3k", folder)["id"] == ["a.png", "link.png"]


def test_image_folder_paths_outside_the_folder_are_refused(tmp_path, outside):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(_encoded("PNG"))
    (folder / "metadata.csv").write_text("file_name,latitude,longitude\na.png,1,2\n../secret/x.png,3,4\n")
    with pytest.raises(ValueError, match=r"Cannot read image folder .*'../secret/x.png'"):
        load_geo_dataset(folder)
    (folder / "metadata.csv").write_text("file_name,latitude,longitude\na.png,1,2\nlink.png,3,4\n")
    (folder / "link.png").symlink_to(outside)
    with pytest.raises(ValueError, match=r"link.png' -> '.*secret/x.png'"):
        load_geo_dataset(folder)


@pytest.mark.parametrize("linked", ["images", "im2gps3k_places365.csv"])
def test_benchmark_image_folder_or_csv_linked_outside_is_refused(tmp_path, outside, linked):
    """`DIR/images` (or the CSV) as a symbolic link to elsewhere: nothing outside DIR is scored or listed."""
    folder = _benchmark_folder(tmp_path, ["a.png"])
    elsewhere = tmp_path / "elsewhere"
    (folder / linked).rename(elsewhere)
    (folder / linked).symlink_to(elsewhere)
    with pytest.raises(ValueError, match=rf"'{linked}' is outside the dataset folder .*symbolic link to "
                                         rf"'{elsewhere}'"):
        load_benchmark("im2gps3k", folder)


def _parquet_with_path_cells(folder, paths):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    cells = [{"bytes": None, "path": str(path)} for path in paths]
    table = pa.table({"image": cells, "latitude": [1.0] * len(paths), "longitude": [2.0] * len(paths)})
    pq.write_table(table, folder / "shard.parquet")
    return folder


def test_parquet_cells_naming_files_outside_the_dataset_are_never_read(tmp_path, outside):
    shards = _parquet_with_path_cells(tmp_path / "shards", [tmp_path / "shards" / "a.png", "/etc/passwd", outside])
    (shards / "a.png").write_bytes(_encoded("PNG"))
    with pytest.raises(ValueError, match=r"has 2 image cell\(s\) naming a file outside .* \(first: '/etc/passwd'\)"):
        load_geo_dataset(shards)
    streamed = list(load_geo_dataset(shards, streaming=True))
    images, kept, errors = decode_images([row["image"] for row in streamed])
    assert kept == [0] and [position for position, _ in errors] == [1, 2]
    assert all("neither bytes nor a path" in message and "passwd" not in message for _, message in errors)
    fine = _parquet_with_path_cells(tmp_path / "fine", [tmp_path / "fine" / "a.png"])  # inside its folder: read
    (fine / "a.png").write_bytes(_encoded("PNG"))
    assert decode_images(load_geo_dataset(fine)["image"])[1] == [0]


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def geoclip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("geoclip")
    save_tiny_geoclip(folder, GALLERY)
    return folder


@pytest.fixture(scope="module")
def geohier_dir(tmp_path_factory):
    from test_geohier import synthetic_cells

    folder = tmp_path_factory.mktemp("geohier")
    torch.manual_seed(0)
    model = GeoHierModel(tiny_geohier_config()).eval()
    model.set_cell_table(synthetic_cells())
    model.save_pretrained(folder)
    return folder


def _edited_copy(source, target, edit_weights=None, edit_config=None):
    target.mkdir(exist_ok=True)
    weights = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    if edit_weights:
        edit_weights(weights)
    if edit_config:
        edit_config(config)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return target


def _set(name, row, value):
    def edit(weights):
        weights[name][row] = value
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("gallery.coordinates", 2, torch.tensor([200_000_000, 0], dtype=torch.int32)),
         r"checkpoint gallery.coordinates\[2\] = \(200.0, 0.0\): latitude must be in \[-90, 90\]"),
        (_set("gallery.embeddings", 1, float("nan")),  # one row: projection_dim values
         rf"tensor 'gallery.embeddings' holds {tiny_geoclip_config().projection_dim} NaN or infinite"),
        (_set("image_mlp.0.weight", 0, float("inf")),  # one row: the CLIP embedding's width
         rf"tensor 'image_mlp.0.weight' holds {tiny_geoclip_config().vision_config.projection_dim} NaN or inf"),
        (lambda weights: weights["gps_queue_count"].fill_(10_000), r"GPS queue is out of range"),
    ],
)
def test_geoclip_checkpoint_contents_are_validated(geoclip_dir, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        GeoCLIPModel.from_pretrained(_edited_copy(geoclip_dir, tmp_path / "edited", edit))


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("cell_table.centroids_1", 3, torch.tensor([0, -999_000_000], dtype=torch.int32)),
         r"cell table is invalid: cell table level 1 centroids\[3\] = \(0.0, -999.0\): longitude"),
        (_set("cell_table.parents_2", 0, 99), r"cell table is invalid: Level 2, cell 0: parent index 99"),
        (_set("classifiers.1.weight", 0, float("nan")),  # one row: hidden_size values
         rf"tensor 'classifiers.1.weight' holds {tiny_geohier_config().hidden_size} NaN"),
    ],
)
def test_geohier_checkpoint_contents_are_validated(geohier_dir, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        GeoHierModel.from_pretrained(_edited_copy(geohier_dir, tmp_path / "edited", edit))


def test_config_sizes_are_checked_against_the_file_before_allocating(geoclip_dir, geohier_dir, tmp_path):
    """A config claiming 1e9 gallery points (or cells) would need ~256 GB: refused from the safetensors header."""
    huge = 1_000_000_000
    started = time.perf_counter()
    edited = _edited_copy(geoclip_dir, tmp_path / "geoclip",
                          edit_config=lambda config: config.update(gallery_size=huge))
    with pytest.raises(ValueError, match=rf"gallery.coordinates: \(4, 2\) vs \({huge}, 2\).*nothing was allocated"):
        GeoCLIPModel.from_pretrained(edited)

    def more_cells(config):
        config["cells_per_level"][-1] = huge

    edited = _edited_copy(geohier_dir, tmp_path / "geohier", edit_config=more_cells)
    with pytest.raises(ValueError, match=rf"cell_table.centroids_2: \(32, 2\) vs \({huge}, 2\)"):
        GeoHierModel.from_pretrained(edited)
    assert time.perf_counter() - started < 30


def _without(*names):
    def edit(weights):
        for name in names:
            weights.pop(name, None)
    return edit


@pytest.mark.parametrize("model, edit_config, removed, implied", [
    ("geoclip", {"gallery_size": 1_000_000_000}, ("gallery.coordinates", "gallery.embeddings"),
     "gallery.coordinates"),
    ("geoclip", {"queue_size": 300_000_000}, ("gps_queue_coordinates",), "gps_queue_coordinates"),
    ("geoclip", {"gallery_index_nbytes": 100_000_000_000}, (), "gallery.faiss_index"),
    ("geohier", {"cells_per_level": [8, 16, 300_000_000]}, tuple(f"cell_table.{name}_2" for name in (
        "centroids", "parents", "counts", "cell_ids")) + ("classifiers.2.weight", "classifiers.2.bias"),
     "classifiers.2.weight"),
])
def test_sizes_of_tensors_missing_from_the_file_are_checked_before_allocating(
        geoclip_dir, geohier_dir, tmp_path, model, edit_config, removed, implied):
    """Each would allocate gigabytes (the issue saw 256 GB tried, 2.4 GB allocated) before finding the tensor
    missing: now refused from the config and the header, strict or not."""
    source, model_class = (geoclip_dir, GeoCLIPModel) if model == "geoclip" else (geohier_dir, GeoHierModel)
    edited = _edited_copy(source, tmp_path / "edited", _without(*removed), lambda config: config.update(edit_config))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=rf"missing: \[.*'{implied}'.*nothing was allocated"):
        model_class.from_pretrained(edited)
    with pytest.raises(ValueError, match=rf"implies \d+ bytes of tensors the checkpoint does not hold \(largest: "
                                         rf"\[.*'{implied}: .*above {1 << 30} bytes; nothing was allocated"):
        model_class.from_pretrained(edited, strict=False)
    assert time.perf_counter() - started < 20


def test_a_pickle_checkpoint_loads_only_when_asked_for(geoclip_dir, tmp_path):
    folder = _edited_copy(geoclip_dir, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds only a pickle file \(pytorch_model.bin\).*use_safetensors=False"):
        GeoCLIPModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds only a pickle file"):
        cli.main(["--debug", "predict", "--text", "x", "--model", str(folder)])
    loaded = GeoCLIPModel.from_pretrained(folder, use_safetensors=False)  # the user asked for it
    assert torch.equal(loaded.gallery.coordinates, load_file(geoclip_dir / "model.safetensors")["gallery.coordinates"])


def test_a_folder_naming_its_own_code_is_refused_without_a_prompt(geoclip_dir, tmp_path):
    """transformers would ask "Do you wish to run the custom code?" (and run it on "y"): never asked."""
    folder = _edited_copy(geoclip_dir, tmp_path / "custom", edit_config=lambda config: config.update(
        model_type="surprise", auto_map={"AutoConfig": "evil.Config", "AutoModel": "evil.Model"}))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    result, _ = _run_cli("predict", "--text", "x", "--model", str(folder))
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 1 and line.startswith("geoloc predict: error: ") and "trust_remote_code" in line
    assert not (tmp_path / "ran").exists()


def test_a_truncated_weights_file_is_named(geoclip_dir, tmp_path):
    edited = _edited_copy(geoclip_dir, tmp_path / "cut")
    data = (edited / "model.safetensors").read_bytes()
    (edited / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors' is not a readable safetensors file \(truncated"):
        GeoCLIPModel.from_pretrained(edited)


@pytest.fixture
def keep_torch_threads():
    """FAISS sets the OpenMP thread count it shares with torch (`search_threads`): restore torch's afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_corrupted_faiss_index_is_refused(tmp_path, keep_torch_threads):
    pytest.importorskip("faiss")
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    model.set_gallery(GALLERY, backend="faiss")
    assert len(model.config.gallery_index_sha256) == 64
    model.save_pretrained(tmp_path / "faiss")
    reloaded = GeoCLIPModel.from_pretrained(tmp_path / "faiss")
    assert torch.equal(reloaded.gallery.faiss_index, model.gallery.faiss_index)

    def flip_a_byte(weights):
        weights["gallery.faiss_index"][-5] ^= 0xFF

    edited = _edited_copy(tmp_path / "faiss", tmp_path / "corrupt", flip_a_byte)
    with pytest.raises(ValueError, match=r"FAISS index \(gallery.faiss_index, \d+ bytes\) does not match the SHA-256"):
        GeoCLIPModel.from_pretrained(edited)

    unhashed = _edited_copy(tmp_path / "faiss", tmp_path / "unhashed",
                            edit_config=lambda config: config.update(gallery_index_sha256=None))
    with pytest.raises(ValueError, match=r"records no SHA-256 of its FAISS index.*require_hashes=False"):
        GeoCLIPModel.from_pretrained(unhashed)
    trusted = GeoCLIPModel.from_pretrained(unhashed, require_hashes=False)  # asked for explicitly
    assert torch.equal(trusted.gallery.faiss_index, model.gallery.faiss_index)

    # crafted bytes whose hash (and size) were recomputed: refused at load, not at the first query
    crafted_bytes = model.gallery.faiss_index[: len(model.gallery.faiss_index) // 2].clone()

    def crafted_config(config):
        config.update(gallery_index_nbytes=len(crafted_bytes), gallery_index_sha256=tensor_sha256(crafted_bytes))

    crafted = _edited_copy(tmp_path / "faiss", tmp_path / "crafted",
                           lambda weights: weights.update({"gallery.faiss_index": crafted_bytes}), crafted_config)
    with pytest.raises(ValueError, match=r"FAISS index \(gallery.faiss_index\) cannot be read"):
        GeoCLIPModel.from_pretrained(crafted)
    other = GeoCLIPModel(tiny_geoclip_config()).eval()
    other.set_gallery(GALLERY[:3], backend="faiss")  # a sound index of another gallery
    foreign = _edited_copy(tmp_path / "faiss", tmp_path / "foreign", lambda weights: weights.update(
        {"gallery.faiss_index": other.gallery.faiss_index}), lambda config: config.update(
        gallery_index_nbytes=len(other.gallery.faiss_index), gallery_index_sha256=tensor_sha256(other.gallery.faiss_index)))
    with pytest.raises(ValueError, match=r"FAISS index holds 3 vectors .* not the gallery's 4"):
        GeoCLIPModel.from_pretrained(foreign)
    # the normaliser sample must name distinct gallery rows (each is dropped once when retrieved)
    assert model.gallery.sample_indices.tolist() == [0, 1, 2, 3]
    for rows, message in (([0, 1, 2, 9], r"sample_indices must be gallery rows in \[0, 4\), got values in \[0, 9\]"),
                          ([0, 1, 1, 3], "sample_indices must be distinct rows in increasing order"),
                          ([3, 0, 1, 2], "sample_indices must be distinct rows in increasing order")):
        edited = _edited_copy(tmp_path / "faiss", tmp_path / "sample", lambda weights: weights.update(
            {"gallery.sample_indices": torch.tensor(rows)}))
        with pytest.raises(ValueError, match=message):
            GeoCLIPModel.from_pretrained(edited)
    # a config that names the faiss backend but records no index bytes: a clear error at search, not a crash
    model.gallery._faiss, model.config.gallery_index_nbytes = None, 0
    with pytest.raises(ValueError, match="backend is 'faiss' but it holds no FAISS index"):
        model.search_gallery(torch.nn.functional.normalize(torch.randn(1, model.config.projection_dim), dim=-1), 2)


def test_nan_answers_are_errors_not_numbers(geoclip_dir, geohier_dir):
    geoclip = GeoCLIPModel.from_pretrained(geoclip_dir).eval()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(geoclip.geolocate(pixel_values=pixels, top_k=2).probabilities).all()
    geoclip.logit_scale.data.fill_(float("nan"))  # e.g. a diverged fine-tune, never saved
    with pytest.raises(ValueError, match="geolocate produced NaN or inf in probabilities for input 0"):
        geoclip.geolocate(pixel_values=pixels, top_k=2)
    geohier = GeoHierModel.from_pretrained(geohier_dir).eval()
    nan_pixels = pixels.clone()
    nan_pixels[1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in probabilities for input 1"):
        geohier.geolocate(pixel_values=nan_pixels, top_k=2)


# ------------------------------------------------------------------------------------ CSVs and columns
def test_a_gallery_csv_with_a_byte_order_mark_is_read(tmp_path):
    from geoloc.data.gallery import read_gallery_csv

    path = tmp_path / "gallery.csv"
    path.write_bytes("LAT,LON\n48.8566,2.3522\n-33.8688,151.2093\n".encode("utf-8-sig"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    np.testing.assert_array_equal(read_gallery_csv(path), [[48.8566, 2.3522], [-33.8688, 151.2093]])
    np.testing.assert_array_equal(read_gallery_csv(io.StringIO(path.read_text("utf-8")), "s"), read_gallery_csv(path))


def test_a_million_rows_without_coordinates_are_dropped_at_once(tmp_path, monkeypatch, caplog):
    """The issue measured 106 s for 1e6 NaN rows (58 s re-checking rows one by one, the rest reading the columns
    row by row); column-wise it takes a few seconds."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = 1_000_000
    latitudes = np.full(rows, np.nan)
    latitudes[[0, 500_000]] = [10.0, 20.0]
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b"x", "path": None}] * rows, "latitude": latitudes,
                             "longitude": np.zeros(rows)}), tmp_path / "shards" / "rows.parquet")
    started = time.perf_counter()
    dataset = load_geo_dataset(tmp_path / "shards")
    seconds = time.perf_counter() - started
    assert dataset["latitude"][:] == [10.0, 20.0]
    assert f"Skipping {rows - 2} of {rows} rows with invalid coordinates" in caplog.text
    assert "row 1: (nan, 0.0): coordinates must be finite" in caplog.text
    assert seconds < 30, f"{seconds:.1f} s"


# ---------------------------------------------------------------------------------------------- publish
def test_publish_writes_no_local_path_and_copies_no_link(geoclip_dir, geohier_dir, tmp_path):
    """After `train --backbone /home/alice/private-models/clip-tiny`: the path reached config.json (`backbone`,
    `_name_or_path`) and the README."""
    private = "/home/alice/private-models/clip-tiny"

    def trained_locally(config):
        config.update(backbone=private, _name_or_path=private)
        config["vision_config"]["_name_or_path"] = private

    folder = _edited_copy(geoclip_dir, tmp_path / "run", edit_config=trained_locally)
    for name in ("preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "tokenizer.json"):
        if (geoclip_dir / name).exists():
            (folder / name).write_bytes((geoclip_dir / name).read_bytes())
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "name_or_path": private}))
    assert cli.main(["publish", str(folder), "--repo-id", "me/tiny", "--local-dir", str(tmp_path / "repo")]) == 0
    published = {path: path.read_bytes() for path in (tmp_path / "repo").rglob("*") if path.is_file()}
    assert not [path for path, data in published.items() if b"/home/alice" in data or str(tmp_path).encode() in data]
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert config["backbone"] is None and "_name_or_path" not in json.dumps(config)
    assert GeoCLIPModel.from_pretrained(tmp_path / "repo").config.backbone is None  # still loads

    hier = _edited_copy(geohier_dir, tmp_path / "hier", edit_config=lambda config: config.update(_name_or_path=private))
    tiny_image_processor("geohier").save_pretrained(hier)
    assert cli.main(["publish", str(hier), "--repo-id", "me/hier", "--local-dir", str(tmp_path / "hier-repo")]) == 0
    assert "/home/alice" not in (tmp_path / "hier-repo" / "config.json").read_text()

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (folder / "tokenizer.json").unlink(missing_ok=True)
    (folder / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ValueError, match=r"holds symbolic link\(s\) \['tokenizer.json'\]: publish copies no link"):
        cli.main(["--debug", "publish", str(folder), "--repo-id", "me/tiny", "--local-dir", str(tmp_path / "r2")])
    assert not (tmp_path / "r2").exists()


# --------------------------------------------------------------------------- no silent data loss or mixing
def _image_folder(folder, count=3):
    folder.mkdir()
    for number in range(count):
        Image.new("RGB", (40, 40), (number * 60, 90, 30)).save(folder / f"{number}.png")
    rows = "".join(f"{number}.png,{number},{number}\n" for number in range(count))
    (folder / "metadata.csv").write_text("file_name,latitude,longitude\n" + rows)
    return folder


def test_train_never_replaces_a_saved_model_without_overwrite(geoclip_dir, tmp_path, capsys):
    model = _edited_copy(geoclip_dir, tmp_path / "model")
    tiny_image_processor().save_pretrained(model)
    weights = (model / "model.safetensors").read_bytes()
    data = _image_folder(tmp_path / "data")
    assert cli.main(["train", "--model", "geoclip", "--model-config", str(model), "--dataset", str(data),
                     "--output-dir", str(model), "--max-steps", "1"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"geoloc train: error: --output-dir {model} holds a saved model (config.json, model.safetensors) "
                    "that training would replace: choose a new folder, or pass --overwrite to replace it.")
    assert (model / "model.safetensors").read_bytes() == weights


def test_resume_refuses_every_changed_setting_that_affects_the_weights(tmp_path):
    from geoloc.training import train

    def settings(*options):
        argv = ["--model", "geoclip", "--dataset", "d", "--output-dir", str(tmp_path), *options]
        return train.run_settings(train.resolve_args(train.build_parser().parse_args(argv)), max_steps=10,
                                  num_processes=1, train_rows=100)

    checkpoint = tmp_path / "step"
    checkpoint.mkdir()
    (checkpoint / train.RUN_SETTINGS).write_text(json.dumps(settings()))
    train.check_resume_settings(str(checkpoint), settings("--log-every", "3", "--num-workers", "2"))  # no effect
    changed = ["--augmentation", "none", "--gps-noise-km", "7", "--weight-decay", "0.5", "--max-grad-norm", "0.25",
               "--queue-size", "16", "--mixed-precision", "bf16"]
    with pytest.raises(ValueError, match="was made with other settings") as error:
        train.check_resume_settings(str(checkpoint), settings(*changed))
    for name in ("augmentation", "gps_noise_km", "weight_decay", "max_grad_norm", "queue_size", "mixed_precision"):
        assert f"{name}=" in str(error.value)
    with pytest.raises(ValueError, match=r"label_smoothing=.* \(now 0.3\)"):  # a GeoHier task option
        geohier = ["--model", "geohier", "--dataset", "d", "--output-dir", str(tmp_path)]
        parse = train.build_parser().parse_args
        (checkpoint / train.RUN_SETTINGS).write_text(json.dumps(train.run_settings(
            train.resolve_args(parse(geohier)), max_steps=10, num_processes=1, train_rows=100)))
        train.check_resume_settings(str(checkpoint), train.run_settings(train.resolve_args(parse(
            [*geohier, "--label-smoothing", "0.3"])), max_steps=10, num_processes=1, train_rows=100))


def test_predict_dataset_resume_checks_the_model_content_and_keeps_other_files(geoclip_dir, tmp_path, monkeypatch,
                                                                                capsys):
    from geoloc.inference import runner

    model = _edited_copy(geoclip_dir, tmp_path / "model")
    for name in ("preprocessor_config.json", "tokenizer_config.json", "tokenizer.json"):
        (model / name).write_bytes((geoclip_dir / name).read_bytes())
    data = _image_folder(tmp_path / "data")
    (data / "thin.png").write_bytes(png_declaring(4, 16777216))  # one skipped, reported image: the run finishes
    with open(data / "metadata.csv", "a") as metadata:
        metadata.write("thin.png,0,0\n")
    output = tmp_path / "report.csv"
    errors = tmp_path / "report.errors.csv"
    errors.write_text("mine, not geoloc's\n")
    command = ["predict", "--dataset", str(data), "--output", str(output), "--top-k", "2", "--model", str(model),
               "--chunk-size", "1"]
    assert cli.main(command) == 1
    assert f"{errors} already exists" in capsys.readouterr().err and errors.read_text() == "mine, not geoloc's\n"
    errors.rename(tmp_path / "kept.csv")

    def killed(self, *args):
        raise RuntimeError("killed before merging")

    monkeypatch.setattr(runner.ChunkParts, "merge", killed)
    assert cli.main(command) == 1  # the parts are written; the run is resumable
    assert "killed before merging" in capsys.readouterr().err
    assert len(list((tmp_path / "report.csv.parts").glob("chunk-*.parquet"))) == 4
    # retrained in place: same path, other weights
    _edited_copy(geoclip_dir, model, _set("logit_scale", (), 1.5))
    assert cli.main(command) == 1
    assert "holds a run with other options (model_sha256: " in capsys.readouterr().err
    _edited_copy(geoclip_dir, model)  # the original weights again, and the model moved: resumes
    model.rename(tmp_path / "moved")
    monkeypatch.undo()
    assert cli.main([*command[:-3], str(tmp_path / "moved"), "--chunk-size", "1"]) == 0
    assert output.is_file() and (tmp_path / "kept.csv").is_file()
    [unreadable] = list(csv.DictReader(errors.open()))  # this run's own errors file
    assert unreadable["id"] == "thin.png" and "too elongated" in unreadable["error"]


# ------------------------------------------------------------------------------------------------- CLI
def _run_cli(*args, env=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "geoloc.cli", *args], capture_output=True, text=True,
                            cwd=REPO, env=environment, timeout=300)
    return result, time.perf_counter() - started


def test_cli_failures_are_one_line_with_exit_status_1(geoclip_dir, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(_encoded("PNG", (40, 40)))
    cut = _edited_copy(geoclip_dir, tmp_path / "cut")
    tiny_image_processor().save_pretrained(cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-100])

    def zero_width(config):
        config["vision_config"]["hidden_size"] = 0

    zero = _edited_copy(geoclip_dir, tmp_path / "zero", edit_config=zero_width)
    tiny_image_processor().save_pretrained(zero)
    cases = [
        (["predict", str(image), "--model", str(cut)], "not a readable safetensors file"),
        (["predict", str(image), "--model", str(zero)], "Cannot build GeoCLIPModel from the config"),
    ]
    for args, message in cases:
        result, _ = _run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"geoloc {args[0]}: error: ") and message in lines[0]
    result, _ = _run_cli("--debug", "convert", str(tmp_path / "missing.whl"), str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ValueError: GeoCLIP source")


def test_publish_without_network_fails_at_once_saying_what_to_do(geoclip_dir, capsys, monkeypatch):
    """No network is touched: the Hub endpoint is a closed port on this machine."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    started = time.perf_counter()
    assert cli.main(["publish", str(geoclip_dir), "--repo-id", "someone/tiny"]) == 1
    assert time.perf_counter() - started < 10
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("geoloc publish: error: ") and "offline mode" in line
    assert "http://127.0.0.1:9 is unreachable" in line and "HF_HUB_OFFLINE=1" in line
