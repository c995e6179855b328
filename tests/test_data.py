"""geoloc.data.dataset: every source kind gives the canonical columns; bad rows are counted and skipped."""

import numpy as np
import pytest
import torch
from PIL import Image

from geoloc.data.dataset import GeoCollator, decode_image, invalid_coordinate_rows, load_geo_dataset
from geoloc.configs import tiny_image_processor


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "metadata.csv").write_text(
        "file_name,lat,lon,scene\n0.png,10,20,1\n1.png,95,0,0\n2.png,,3,1\n3.png,1,2,0\n4.png,-10,-190,1\n"
        "broken.png,5,5,0\n"
    )
    return tmp_path


def test_image_folder_renames_columns_and_skips_bad_coordinates(image_folder, caplog):
    dataset = load_geo_dataset(image_folder, lat_column="lat", lon_column="lon")
    assert set(dataset.column_names) == {"image", "latitude", "longitude", "scene"}
    assert dataset["latitude"] == [10.0, 1.0, 5.0] and dataset["longitude"] == [20.0, 2.0, 5.0]
    assert "Skipping 3 of 6 rows with invalid coordinates" in caplog.text
    assert isinstance(dataset[0]["image"], dict)  # undecoded until collation


def test_missing_column_is_a_clear_error(image_folder):
    with pytest.raises(ValueError, match=r"\['latitude', 'longitude'\] not found"):
        load_geo_dataset(image_folder)


def test_parquet_shards_and_streaming(tmp_path):
    import datasets

    buffer = tmp_path / "0.png"
    Image.new("RGB", (8, 8), "red").save(buffer)
    rows = {"image": [{"bytes": buffer.read_bytes(), "path": None}] * 3,
            "latitude": [0.0, 100.0, 45.0], "longitude": [1.0, 1.0, float("nan")], "id": ["a", "b", "c"]}
    features = datasets.Features({"image": datasets.Image(), "latitude": datasets.Value("float64"),
                                  "longitude": datasets.Value("float64"), "id": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "shard-0.parquet"))
    dataset = load_geo_dataset(str(tmp_path / "shard-0.parquet"))
    assert dataset["id"] == ["a"]
    assert decode_image(dataset[0]["image"]).size == (8, 8)
    streamed = list(load_geo_dataset(str(tmp_path), streaming=True))
    assert [row["id"] for row in streamed] == ["a"]


def test_collator_skips_unreadable_images(image_folder, caplog):
    dataset = load_geo_dataset(image_folder, lat_column="lat", lon_column="lon")
    collate = GeoCollator(tiny_image_processor(), label_columns=["scene"])
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["locations"], torch.tensor([[10.0, 20.0], [1.0, 2.0]], dtype=torch.float64))
    assert batch["scene"].tolist() == [1, 0]
    assert batch["unreadable"] == 1 and "broken.png" in caplog.text


def test_invalid_coordinate_rows_names_rows():
    bad = invalid_coordinate_rows([0.0] * 5000 + [91.0, "x"], [0.0] * 5002)
    assert [row for row, _ in bad] == [5000, 5001]
    assert "latitude must be in [-90, 90]" in bad[0][1]


def test_augmentation_draws_depend_on_seed_epoch_and_image_only(image_folder):
    from geoloc.training.augment import build_augmentation

    dataset = load_geo_dataset(image_folder, lat_column="lat", lon_column="lon")
    rows = [dataset[i] for i in range(len(dataset))]

    def pixels(epoch, seed=0, order=slice(None)):
        collate = GeoCollator(tiny_image_processor(), augment=build_augmentation("map"), seed=seed)
        collate.epoch = epoch
        return collate(rows[order])["pixel_values"]

    first = pixels(0)
    assert torch.equal(first, pixels(0))                       # reproducible: a resumed run sees the same images
    assert torch.equal(first.flip(0), pixels(0, order=slice(None, None, -1)))  # whatever the batch it is in
    assert not torch.equal(first, pixels(1))                   # a new draw every epoch
    assert not torch.equal(first, pixels(0, seed=1))           # and every seed
    plain = GeoCollator(tiny_image_processor())(rows)["pixel_values"]
    assert not torch.equal(first, plain)
