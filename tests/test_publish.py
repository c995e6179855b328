"""`geoloc publish` up to the Hub commit, with a recording stand-in for `HfApi`: the exact files (an allow-list:
never training state, logs or pickles), the remote code and `auto_map`, `--local-dir`, the card's YAML
(model-index for every benchmark x metric) and its round trip through `ModelCard.load`."""

import json
import shutil

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, SpaceCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from geoloc.hub import publish as publish_module
from geoloc.configs import byte_level_clip_tokenizer, tiny_geoclip_config, tiny_geohier_config, tiny_image_processor
from geoloc.hub.publish import METRIC_NAMES, checkpoint_files, hub_files, main, publish, render_model_card
from geoloc.hub.remote_code import PACKAGES_ROOT as REPO_ROOT
from geoloc.hub.space import export_space
from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel
from modeling_geohier import GeoHierModel
from tests.test_geohier import synthetic_cells

METRICS = {"im2gps3k": 0.1, "osv5m": 0.02}
GEOCLIP_CODE = ["configuration_geoclip.py", "gallery_geoclip.py", "geo_common.py", "geo_image_processing.py",
                "image_processing_geoclip.py", "integrity.py", "modeling_geoclip.py", "pipeline_geolocation.py"]
GEOHIER_CODE = ["configuration_geohier.py", "geo_common.py", "geo_image_processing.py", "image_processing_geohier.py",
                "integrity.py", "modeling_geohier.py", "pipeline_geolocation.py"]
PIPELINES = {"image-geolocation": {"impl": "pipeline_geolocation.ImageGeolocationPipeline", "pt": ["AutoModel"],
                                   "tf": [], "type": "image"}}
GENERATED = {"README.md", "config.json", "preprocessor_config.json"}  # made for the repo, not copied


class RecordingApi:
    """Stands in for `HfApi`: records repo creations, commits (with the bytes of every file) and variables."""

    def __init__(self, token=None):
        self.repos, self.commits, self.variables = [], [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        self.commits.append((repo_id, files, kwargs))
        return type("CommitInfo", (), {"pr_url": None, "commit_url": f"https://hub/{repo_id}/commit/1"})()

    def add_space_variable(self, repo_id, key, value):
        self.variables.append((repo_id, key, value))


@pytest.fixture(scope="module")
def tiny_model():
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    model.set_gallery(np.random.default_rng(0).uniform([-90, -180], [90, 180], size=(16, 2)))
    processor = tiny_image_processor("geoclip")
    return model, processor


@pytest.fixture
def checkpoint(tmp_path, tiny_model):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def eval_dirs(tmp_path):
    dirs = []
    for dataset, accuracy in METRICS.items():
        folder = tmp_path / "eval" / dataset
        folder.mkdir(parents=True)
        metrics = {"acc_1km": accuracy, "acc_25km": 0.2, "acc_200km": 0.3, "acc_750km": 0.5, "acc_2500km": 0.75,
                   "mean_km": 1500.123, "median_km": 600.456, "geoscore": 2500.5, "n": 100, "n_unreadable": 1,
                   "model": "/home/me/runs/ckpt", "dataset": dataset, "top_k": 1}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        dirs.append(str(folder))
    return dirs


def _card(files) -> ModelCard:
    return ModelCard(files["README.md"].decode())


def test_publish_folder_with_results_and_space(checkpoint, eval_dirs, tmp_path):
    api = RecordingApi()
    publish(checkpoint, "me/tiny-geoclip", eval_dirs=eval_dirs, private=True, revision="main", create_pr=True,
            space_id="me/tiny-geoclip-demo", api=api)

    assert api.repos == [
        ("me/tiny-geoclip", {"repo_type": "model", "private": True, "exist_ok": True}),
        ("me/tiny-geoclip-demo", {"repo_type": "space", "space_sdk": "gradio", "private": True, "exist_ok": True}),
    ]
    (model_repo, files, options), (space_repo, space_files, space_options) = api.commits
    assert model_repo == "me/tiny-geoclip"
    assert options["repo_type"] == "model" and options["revision"] == "main" and options["create_pr"] is True
    assert sorted(files) == sorted(["README.md", "config.json", "eval_results/im2gps3k.json",
                                    "eval_results/osv5m--osv5m.json", "model.safetensors",
                                    "preprocessor_config.json", *GEOCLIP_CODE])
    assert files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()  # gallery inside
    assert files["geo_common.py"] == (REPO_ROOT / "modeling_geoclip" / "geo_common.py").read_bytes()
    config = json.loads(files["config.json"])
    assert config["auto_map"] == {"AutoConfig": "configuration_geoclip.GeoCLIPConfig",
                                  "AutoModel": "modeling_geoclip.GeoCLIPModel"}
    assert config["custom_pipelines"] == PIPELINES
    assert {k: v for k, v in config.items() if k not in ("auto_map", "custom_pipelines")} == json.loads(
        (checkpoint / "config.json").read_text())
    processor = json.loads(files["preprocessor_config.json"])
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_geoclip.GeoCLIPImageProcessor"}
    assert processor["image_processor_type"] == "GeoCLIPImageProcessor"
    # eval results keep the metrics, name the dataset, and carry no local path
    assert json.loads(files["eval_results/im2gps3k.json"]) == {
        "dataset": "im2gps3k", "acc_1km": 0.1, "acc_25km": 0.2, "acc_200km": 0.3, "acc_750km": 0.5,
        "acc_2500km": 0.75, "mean_km": 1500.123, "median_km": 600.456, "geoscore": 2500.5, "n": 100,
        "n_unreadable": 1, "top_k": 1}
    assert json.loads(files["eval_results/osv5m--osv5m.json"])["dataset"] == "osv5m/osv5m"
    assert not any(b"/home/me" in content for content in files.values())

    card = _card(files)
    metadata = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["license"] == "mit"
    # what the model is: the tiny tower is no Hub repo (no base_model); only Hub datasets are named
    assert metadata["pipeline_tag"] == "image-classification" and "base_model" not in metadata
    assert metadata["datasets"] == ["osv5m/osv5m"] and metadata["model-index"][0]["name"] == "tiny-geoclip"
    results = metadata["model-index"][0]["results"]
    assert {(r["dataset"]["name"], r["dataset"]["type"]) for r in results} == {
        ("Im2GPS3k", "im2gps3k"), ("OSV-5M", "osv5m/osv5m")}
    for result in results:
        assert result["task"] == {"type": "image-geolocation", "name": "Image geolocation"}
        assert [metric["type"] for metric in result["metrics"]] == list(METRIC_NAMES)
    values = {(e.dataset_name, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert len(values) == 16
    assert values[("Im2GPS3k", "acc_1km")] == 10.0 and values[("OSV-5M", "acc_1km")] == 2.0
    assert values[("OSV-5M", "median_km")] == 600.46 and values[("OSV-5M", "geoscore")] == 2500.5

    text = card.text
    assert "| Im2GPS3k | 100 (1 unreadable, skipped) | 10.0 | 20.0 | 30.0 | 50.0 | 75.0 | 600 | 2500 |" in text
    assert "not measured by us" in text and "| Im2GPS3k | 14.11 | 34.47 | 50.65 | 69.67 | 83.82 |" in text
    assert "locating people" in text and 'AutoModel.from_pretrained("me/tiny-geoclip")' in text
    assert 'AutoModel.from_pretrained("me/tiny-geoclip", trust_remote_code=True)' in text
    assert "random-tiny-clip" in text and "16 GPS points" in text

    assert space_repo == "me/tiny-geoclip-demo" and space_options["repo_type"] == "space"
    # what `geoloc space` assembles: the app, its requirements and the package sources it imports
    exported = export_space(tmp_path / "exported")
    assert sorted(space_files) == sorted(
        path.relative_to(exported).as_posix() for path in exported.rglob("*") if path.is_file()
    )
    assert {"app.py", "requirements.txt", "geoloc/inference/evaluate.py", "modeling_geoclip/__init__.py"} <= set(space_files)
    assert space_files["app.py"] == (exported / "app.py").read_bytes()
    space_card = SpaceCard(space_files["README.md"].decode())
    original = SpaceCard.load(exported / "README.md")
    assert space_card.data.sdk == "gradio" and space_card.data.models == ["me/tiny-geoclip"]
    assert {**original.data.to_dict(), "models": ["me/tiny-geoclip"]} == space_card.data.to_dict()
    assert space_card.text == original.text
    assert api.variables == [("me/tiny-geoclip-demo", "GEOLOC_MODEL", "me/tiny-geoclip")]


def test_card_metadata_validates_and_round_trips(checkpoint, eval_dirs, tmp_path):
    api = RecordingApi()
    publish(checkpoint, "me/tiny-geoclip", eval_dirs=eval_dirs, api=api)
    files = api.commits[0][1]
    (tmp_path / "README.md").write_bytes(files["README.md"])
    loaded = ModelCard.load(tmp_path / "README.md")
    original = _card(files)
    assert loaded.data.to_dict() == original.data.to_dict()
    assert loaded.data.eval_results == original.data.eval_results
    # the YAML rebuilds the same card data, and its model-index parses back to the same results
    rebuilt = ModelCardData(**loaded.data.to_dict())
    assert rebuilt.to_dict() == loaded.data.to_dict()
    name, results = model_index_to_eval_results(loaded.data.to_dict()["model-index"])
    assert name == "tiny-geoclip" and results == loaded.data.eval_results
    assert all(result.dataset_split == "test" for result in results)


def test_publish_model_object_through_patched_hfapi(tiny_model, checkpoint, monkeypatch):
    api = RecordingApi()
    monkeypatch.setattr(publish_module, "HfApi", lambda token=None: api)
    model, processor = tiny_model
    publish(model, "me/obj", image_processor=processor)
    files = api.commits[0][1]
    assert sorted(files) == sorted(["README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                                    *GEOCLIP_CODE])
    assert files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    card = _card(files)
    assert card.data.eval_results is None and "has not been evaluated yet" in card.text
    with pytest.raises(ValueError, match="needs its image_processor"):
        publish(model, "me/obj")


def test_cli_main(checkpoint, eval_dirs, monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr(publish_module, "HfApi", lambda token=None: api)
    assert main([str(checkpoint), "--repo-id", "me/cli", "--eval-dir", eval_dirs[0], "--training-data",
                 "World-map crops."]) == 0
    assert "https://hub/me/cli/commit/1" in capsys.readouterr().out
    assert [repo for repo, _ in api.repos] == ["me/cli"]
    assert "World-map crops." in _card(api.commits[0][1]).text


def test_geohier_card_carries_the_paper_anchor_figures():
    card = render_model_card(tiny_geohier_config(), "me/geohier", [])
    text = card.text
    assert "Reported in the paper (not measured by us)" in text
    for row in ("| Im2GPS3k | 12.8 | 33.5 | 45.9 | 61.0 | 76.1 |", "| YFCC4k | 10.3 | 24.4 | 33.9 | 50.0 | 68.7 |",
                "| GWS15k | 0.7 | 1.5 | 8.7 | 26.9 | 50.5 |"):
        assert row in text
    assert "8 / 16 / 32 cells per level" in text and "geohier" in card.data.tags
    # only what GeoHier can do: it reads no text
    assert "locate_texts" not in text and "locate_images" in text


def test_card_names_the_pretrained_tower_and_the_hub_training_data():
    config = tiny_geoclip_config(backbone="openai/clip-vit-base-patch32")
    run = {"dataset": "someone/geotagged-photos", "backbone": None}
    card = render_model_card(config, "me/my-model", [], training_run=run)
    assert card.data.base_model == "openai/clip-vit-base-patch32" and card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["someone/geotagged-photos"] and card.data.model_name == "GeoCLIP my-model"
    assert "\n# GeoCLIP my-model\n" in card.text  # the heading: the family and the repo name
    local = render_model_card(tiny_geoclip_config(), "me/geoclip-x", [], training_run={"dataset": "/data/photos"})
    assert local.data.datasets is None and local.data.model_name == "geoclip-x"  # never a local path


def test_rejects_bad_inputs(checkpoint, eval_dirs, tmp_path):
    api = RecordingApi()
    with pytest.raises(ValueError, match="has no metrics.json"):
        publish(checkpoint, "me/x", eval_dirs=[str(tmp_path)], api=api)
    with pytest.raises(ValueError, match=r"same dataset: \['im2gps3k'\]"):
        publish(checkpoint, "me/x", eval_dirs=[eval_dirs[0], eval_dirs[0]], api=api)
    with pytest.raises(ValueError, match="has no config.json"):
        publish(tmp_path, "me/x", api=api)
    with pytest.raises(ValueError, match="No card template"):
        render_model_card(type("Config", (), {"model_type": "unknown"})(), "me/x", [])
    assert api.repos == [] and api.commits == []


def _training_folder(checkpoint):
    """A `geoloc train` output folder: the saved model plus everything training leaves next to it."""
    byte_level_clip_tokenizer().save_pretrained(checkpoint)
    step = checkpoint / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (step / name).write_bytes(b"training state")
    (checkpoint / "tensorboard").mkdir()
    (checkpoint / "tensorboard" / "events.out.tfevents.1700000000.host").write_bytes(b"events")
    (checkpoint / "log.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    (checkpoint / "hparams.yml").write_text("dataset: /home/me/data\n")
    (checkpoint / "train_summary.json").write_text(json.dumps({"args": {"dataset": "/home/me/data"}}))
    for name in ("optimizer.pt", "rng_state.pkl", "pytorch_model.bin", "training_args.bin"):
        (checkpoint / name).write_bytes(b"pickle")
    (checkpoint / "modeling_geoclip.py").write_text("# stale code saved by register_for_auto_class\n")
    (checkpoint / "README.md").write_text("a local note\n")
    (checkpoint / "notes.txt").write_text("/home/me/secret\n")
    (checkpoint / ".cache").mkdir()
    (checkpoint / ".cache" / "x.lock").write_text("")
    return checkpoint


def test_training_folder_uploads_only_the_allow_list(checkpoint, eval_dirs, tmp_path, monkeypatch):
    folder = _training_folder(checkpoint)
    assert [path.name for path in checkpoint_files(folder)] == [
        "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    api = RecordingApi()
    publish(folder, "me/trained", eval_dirs=eval_dirs, api=api)
    uploaded = api.commits[0][1]
    assert sorted(uploaded) == sorted([
        "README.md", "config.json", "eval_results/im2gps3k.json", "eval_results/osv5m--osv5m.json",
        "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", *GEOCLIP_CODE])
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert uploaded[name] == (folder / name).read_bytes(), name
    assert uploaded["modeling_geoclip.py"] == (REPO_ROOT / "modeling_geoclip" / "modeling_geoclip.py").read_bytes()
    assert uploaded["README.md"].decode() != "a local note\n"
    assert not any(b"/home/me" in content for content in uploaded.values())

    # --local-dir writes the same files with the same bytes, and never builds an HfApi
    monkeypatch.setattr(publish_module, "HfApi", lambda token=None: pytest.fail("--local-dir used the network"))
    out = tmp_path / "repo"
    assert main([str(folder), "--repo-id", "me/trained", "--local-dir", str(out),
                 *(arg for folder_ in eval_dirs for arg in ("--eval-dir", folder_))]) == 0
    written = {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert written == uploaded


def test_local_dir_refuses_a_used_folder_and_remote_options(checkpoint, tmp_path, capsys):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a new or empty folder"):
        main([str(checkpoint), "--repo-id", "me/x", "--local-dir", str(out)])
    with pytest.raises(SystemExit) as exited:
        main([str(checkpoint), "--repo-id", "me/x", "--local-dir", str(tmp_path / "new"), "--space"])
    assert exited.value.code == 2 and "--local-dir writes the model repo only" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_geohier_repo_gets_its_own_processor_and_code(tmp_path):
    model = GeoHierModel(tiny_geohier_config()).eval()
    model.set_cell_table(synthetic_cells())
    model.save_pretrained(tmp_path / "ckpt")
    # saved before GeoHier had its own image processor: the folder names GeoCLIP's
    GeoCLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(tmp_path / "ckpt")
    files = hub_files(tmp_path / "ckpt", "me/geohier", tmp_path / "staging")
    assert sorted(files) == sorted(["README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                                    *GEOHIER_CODE])
    assert files["geo_common.py"] == REPO_ROOT / "modeling_geohier" / "geo_common.py"
    processor = json.loads(files["preprocessor_config.json"].read_text())
    original = json.loads((tmp_path / "ckpt" / "preprocessor_config.json").read_text())
    assert processor == {**original, "image_processor_type": "GeoHierImageProcessor",
                         "auto_map": {"AutoImageProcessor": "image_processing_geohier.GeoHierImageProcessor"}}
    config = json.loads(files["config.json"].read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_geohier.GeoHierConfig", "AutoModel": "modeling_geohier.GeoHierModel"}
    assert config["custom_pipelines"] == PIPELINES
    assert {name for name, path in files.items() if tmp_path / "staging" in path.parents} == GENERATED


def test_sharded_weights_are_uploaded_with_their_index(tiny_model, tmp_path):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="200KB")
    processor.save_pretrained(tmp_path / "ckpt")
    shards = sorted(path.name for path in (tmp_path / "ckpt").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    files = hub_files(tmp_path / "ckpt", "me/sharded", tmp_path / "staging")
    assert {*shards, "model.safetensors.index.json"} <= set(files)
    index = json.loads(files["model.safetensors.index.json"].read_text())
    assert set(index["weight_map"].values()) == set(shards)


def test_refuses_folders_without_safe_weights_or_processor(checkpoint, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(checkpoint, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="has no model.safetensors .pickled"):
        checkpoint_files(folder)
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="has no preprocessor_config.json: save the image processor"):
        publish(folder, "me/x", api=RecordingApi())
