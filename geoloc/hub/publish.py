"""`geoloc publish`: push a checkpoint, its model card and its evaluation results to the Hugging Face Hub,
and optionally the Gradio Space that demos it.

What the model repo receives, in one commit (`hub_files` computes the set; `--local-dir` writes it to a folder
instead, with no network):
- from the checkpoint folder, only what `save_pretrained` writes (`checkpoint_files`): config.json,
  model.safetensors (or its shards + index; the GeoCLIP gallery or the GeoHier cell table are inside),
  preprocessor_config.json and tokenizer files. Training state (`checkpoints/`, TensorBoard logs, `log.jsonl`,
  `train_summary.json`, pickles) and anything else in the folder stay local;
- the model's remote code (`geoloc.hub.remote_code`): its modeling folder's source files, with `auto_map` added to
  config.json and preprocessor_config.json, so that `AutoModel` / `AutoImageProcessor.from_pretrained(repo,
  trust_remote_code=True)` work without this package;
- `README.md` rendered from `hub_cards/<model_type>.md` with `huggingface_hub.ModelCard` (its YAML carries a
  `model-index` entry for every benchmark x metric of the given `geoloc evaluate` folders);
- `eval_results/<dataset>.json`: each folder's metrics.json without local paths (`eval_record`).
With `--space`, the Space repo receives what `geoloc space` assembles (`spaces/geolocation/` plus the package
sources), its README's YAML (the Space card of `spaces/geolocation/README.md`) gains `models: [<repo-id>]`, and
its `GEOLOC_MODEL` variable is set to the model repo, which the app loads.

Example:
    geoloc publish ./checkpoints/geoclip --repo-id me/geoclip-vit-l14 --eval-dir eval/im2gps3k \\
        --eval-dir eval/yfcc4k --space
    geoloc publish ./checkpoints/geoclip --repo-id me/geoclip-vit-l14 --local-dir repo/   # offline, inspect
"""

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jinja2
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, SpaceCard
from transformers import AutoConfig

from geo_core.pipeline_geolocation import custom_pipelines_entry

from ..data.benchmarks import BENCHMARKS
from ..cli import HelpFormatter
from ..inference.calibration import card_section
from ..inference.metrics import DEFAULT_THRESHOLDS_KM, threshold_key
from ..models import MODEL_FAMILIES, register_models
from .remote_code import auto_maps, remote_code_files
from ..sources import hub_repo_id

REPO_ROOT = Path(__file__).resolve().parents[2]
CARDS_DIR = REPO_ROOT / "hub_cards"
TASK_TYPE, TASK_NAME = "image-geolocation", "Image geolocation"
ACCURACY_KEYS = [threshold_key(threshold) for threshold in DEFAULT_THRESHOLDS_KM]
METRIC_NAMES = {
    **{threshold_key(t): f"Accuracy within {t:g} km (%)" for t in DEFAULT_THRESHOLDS_KM},
    "mean_km": "Mean error (km)",
    "median_km": "Median error (km)",
    "geoscore": "GeoScore (OSV-5M)",
}
DEFAULT_TRAINING_DATA = (
    "Not stated by the publisher. For reference, the GeoCLIP and GeoDecoder papers train on MP-16 (4.72M "
    "geotagged Flickr photos from YFCC100M, without the photographers of the Im2GPS test sets)."
)
FAMILY_NAMES = {family.model_type: family.name for family in MODEL_FAMILIES}
# The Hub has no geolocation task; both models rank candidates (gallery points, geocells) for an image. The
# `image-geolocation` pipeline itself is named in config.json's `custom_pipelines`.
PIPELINE_TAG = "image-classification"
# Keys naming where a config, processor or tokenizer was loaded from (a local folder, often): never published.
LOADED_FROM_KEYS = ("_name_or_path", "name_or_path")
SKIPPED_NAMES = {"__pycache__", ".git", ".cache", ".gitattributes"}
# What `save_pretrained` of a model, image processor or tokenizer writes: the only files of a checkpoint folder
# that are uploaded. Never pickles (`*.bin`, `*.pt`, `*.pkl`), training state or logs.
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The keys of a `geoloc evaluate` metrics.json that are published (no local paths: `model` is dropped and
# `dataset` becomes the benchmark's id or the dataset folder's name).
EVAL_RECORD_KEYS = (*METRIC_NAMES, "n", "n_unreadable", "top_k", "best_of_top_k")


def load_eval_results(eval_dirs) -> list[dict]:
    """Read `metrics.json` from each `geoloc evaluate` output folder.

    Raises:
        ValueError: when a folder has no metrics.json, lacks a metric, or two folders hold the same dataset.
    """
    results = []
    for eval_dir in eval_dirs:
        path = Path(eval_dir) / "metrics.json"
        if not path.is_file():
            raise ValueError(f"'{eval_dir}' has no metrics.json: pass the --output-dir of a `geoloc evaluate` run.")
        with open(path) as handle:
            metrics = json.load(handle)
        missing = [key for key in [*METRIC_NAMES, "dataset", "n"] if key not in metrics]
        if missing:
            raise ValueError(f"'{path}' lacks {missing}: it is not a `geoloc evaluate` metrics.json.")
        results.append(metrics)
    datasets = [metrics["dataset"] for metrics in results]
    duplicates = sorted({name for name in datasets if datasets.count(name) > 1})
    if duplicates:
        raise ValueError(f"Several --eval-dir folders evaluate the same dataset: {duplicates}.")
    return results


def _dataset_ids(dataset: str) -> tuple[str, str]:
    """(title, id) of an evaluated dataset: a benchmark's paper name and Hub id (or name), else the path's name."""
    if dataset in BENCHMARKS:
        spec = BENCHMARKS[dataset]
        return spec.title, spec.hub_repo or dataset
    name = Path(dataset.rstrip("/")).name or dataset
    return name, name


def _metric_value(metrics: dict, key: str) -> float:
    """A metric as shown on the Hub: accuracies in %, distances in km, GeoScore as is; 2 decimals."""
    return round(metrics[key] * 100 if key in ACCURACY_KEYS else metrics[key], 2)


def eval_results(results: list[dict]) -> list[EvalResult]:
    """One `EvalResult` per dataset x metric, for the card's `model-index`."""
    entries = []
    for metrics in results:
        title, dataset_id = _dataset_ids(metrics["dataset"])
        for key, name in METRIC_NAMES.items():
            entries.append(EvalResult(
                task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=dataset_id, dataset_name=title,
                dataset_split="test", metric_type=key, metric_name=name, metric_value=_metric_value(metrics, key),
            ))
    return entries


def _template(name: str) -> Path:
    path = CARDS_DIR / name
    if not path.is_file():
        raise ValueError(f"No card template '{path}': run `geoloc publish` from a checkout of the repository.")
    return path


def card_metadata(config, repo_id: str, results: list[dict], training_run: dict | None = None) -> dict:
    """The card YAML fields that say what the model is: `pipeline_tag`, `base_model` (the pretrained tower, when
    it is a Hub repo), `datasets` (the Hub datasets it was trained or evaluated on; never a local path) and
    `model_name` (the family and the repo's name). `training_run`: the `args` of the checkpoint's
    `train_summary.json`, if any."""
    training_run = training_run or {}
    name = repo_id.split("/")[-1]
    family = FAMILY_NAMES.get(config.model_type, config.model_type)

    def hub_repo(value) -> bool:
        return hub_repo_id(value) is not None and "/" in value

    base_model = next((value for value in (getattr(config, "backbone", None), training_run.get("backbone"))
                       if hub_repo(value)), None)
    datasets = sorted({value for value in [training_run.get("dataset")]
                       + [_dataset_ids(metrics["dataset"])[1] for metrics in results] if hub_repo(value)})
    return {"pipeline_tag": PIPELINE_TAG, "base_model": base_model, "datasets": datasets or None,
            "model_name": name if family.lower() in name.lower() else f"{family} {name}"}


def render_model_card(config, repo_id: str, results: list[dict], training_data: str = DEFAULT_TRAINING_DATA,
                      license: str = "mit", training_run: dict | None = None) -> ModelCard:
    """Render `hub_cards/<config.model_type>.md` for `repo_id` with the given `geoloc evaluate` results
    (`training_run`: see `card_metadata`).

    Raises:
        ValueError: when there is no card template for the model type.
    """
    template = _template(f"{config.model_type}.md")
    rows = [{"title": _dataset_ids(metrics["dataset"])[0], "n_unreadable": metrics.get("n_unreadable", 0),
             **{key: _metric_value(metrics, key) for key in METRIC_NAMES}, "n": metrics["n"]} for metrics in results]
    results_section = jinja2.Template(_template("_results.md.jinja").read_text()).render(results=rows)
    results_section += card_section(config)  # calibrated confidence and unfamiliar inputs (geoloc calibrate)
    metadata = card_metadata(config, repo_id, results, training_run)
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        tags=["image-geolocation", "geolocation", config.model_type, "geoloc"],
        eval_results=eval_results(results) or None,
        **metadata,
    )
    return ModelCard.from_template(
        card_data, template_path=str(template), model_name=metadata["model_name"], repo_id=repo_id, config=config,
        training_data=training_data, results_section=results_section,
    )


def _folder_operations(folder: Path) -> list[CommitOperationAdd]:
    """One `CommitOperationAdd` per file under `folder` (sorted), leaving out caches and VCS files."""
    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not SKIPPED_NAMES & set(relative.parts):
            operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=str(path)))
    return operations


def checkpoint_files(folder) -> list[Path]:
    """The files of a checkpoint folder that go to the Hub: what `save_pretrained` writes (`CHECKPOINT_FILES`
    and weight shards), top level only, sorted. A `geoloc train` output folder's training state, logs and
    summaries are left out.

    Raises:
        ValueError: when the folder has no config.json, no safetensors weights, or no preprocessor_config.json,
            or when a file to publish is a symbolic link.

    Example:
        >>> [path.name for path in checkpoint_files("runs/geoclip-tiny")]  # doctest: +SKIP
        ['config.json', 'model.safetensors', 'preprocessor_config.json', 'tokenizer.json', 'tokenizer_config.json']
    """
    folder = Path(folder)
    for required, hint in (("config.json", "it is not a checkpoint folder"),
                           ("preprocessor_config.json", "save the image processor next to the model")):
        if not (folder / required).is_file():
            raise ValueError(f"'{folder}' has no {required}: {hint}.")
    files = sorted(path for path in folder.iterdir()
                   if path.is_file() and (path.name in CHECKPOINT_FILES or WEIGHT_SHARD.fullmatch(path.name)))
    links = [path.name for path in files if path.is_symlink()]
    if links:  # publishing a link would upload its target's content, whatever and wherever it is
        raise ValueError(f"'{folder}' holds symbolic link(s) {links}: publish copies no link's target. Replace "
                         "them with the files themselves (e.g. `cp --remove-destination TARGET LINK`).")
    if not any(path.name in ("model.safetensors", "model.safetensors.index.json") for path in files):
        raise ValueError(f"'{folder}' has no model.safetensors (pickled *.bin weights are never uploaded: save the "
                         "model with save_pretrained, which writes safetensors).")
    return files


def eval_record(metrics: dict) -> dict:
    """What `eval_results/<dataset>.json` publishes of a `geoloc evaluate` metrics.json: the metrics and counts,
    with `dataset` reduced to the benchmark's id or the dataset folder's name and no local path."""
    return {"dataset": _dataset_ids(metrics["dataset"])[1],
            **{key: metrics[key] for key in EVAL_RECORD_KEYS if key in metrics}}


def without_local_paths(settings):
    """A JSON settings tree as published: `_name_or_path` / `name_or_path` (where it was loaded from) dropped at
    any depth, `backbone` only as a Hub id (`geoloc.sources.hub_repo_id`)."""
    if isinstance(settings, dict):
        return {key: hub_repo_id(value) if key == "backbone" else without_local_paths(value)
                for key, value in settings.items() if key not in LOADED_FROM_KEYS}
    if isinstance(settings, list):
        return [without_local_paths(value) for value in settings]
    return settings


def _settings_copy(source: Path, destination: Path, auto_map: dict | None = None,
                   image_processor: str | None = None, **extra) -> None:
    """Copy a JSON settings file without local paths, adding `auto_map` and `extra` keys (and naming the model's
    own image processor class) when given."""
    settings = without_local_paths(json.loads(source.read_text()))
    if auto_map is not None:
        settings["auto_map"] = auto_map
    settings.update(extra)
    if image_processor is not None:
        settings["image_processor_type"] = image_processor
    destination.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def hub_files(checkpoint, repo_id: str, staging, *, eval_dirs=(), training_data: str = DEFAULT_TRAINING_DATA,
              license: str = "mit") -> dict[str, Path]:
    """Every file the model repo receives, as `{path in repo: file}`: the one place that decides what is
    uploaded (`publish`, `geoloc publish --local-dir` and `geoloc train --push-to-hub` use it).

    Allow-listed checkpoint files are referenced where they are; the files made for the repo (card, eval
    results, config.json and preprocessor_config.json with `auto_map`, the modeling source files) are written
    under `staging`, an empty folder that must live as long as the result is used.

    Args:
        checkpoint: a folder written by `save_pretrained` (model + image processor, and tokenizer for GeoCLIP),
            e.g. a `geoloc train` output folder.
        repo_id: the model repo, `namespace/name` (named in the card).
        staging: a folder for the generated files.
        eval_dirs: `geoloc evaluate` output folders whose metrics go into the card and `eval_results/`.

    Raises:
        ValueError: on a folder without config.json, weights or image processor, an unpublishable model type, or
            bad eval dirs.
    """
    register_models()  # the checkpoint's config is read through AutoConfig, whichever model it holds
    checkpoint, staging = Path(checkpoint), Path(staging)
    files = {path.name: path for path in checkpoint_files(checkpoint)}
    results = load_eval_results(eval_dirs)
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
    code = remote_code_files(config.model_type)
    processor_class = auto_maps(config.model_type)["preprocessor_config.json"]["AutoImageProcessor"]
    (staging / "eval_results").mkdir(parents=True, exist_ok=True)
    maps = auto_maps(config.model_type)
    for name in [name for name in files if name.endswith("config.json") or name == "special_tokens_map.json"]:
        # `pipeline(model=REPO, trust_remote_code=True)` finds the repo's pipeline in config.json
        extra = {"custom_pipelines": custom_pipelines_entry()} if name == "config.json" else {}
        _settings_copy(files[name], staging / name, maps.get(name),
                       processor_class.split(".")[-1] if name == "preprocessor_config.json" else None, **extra)
        files[name] = staging / name
    files.update(code)
    if hasattr(config, "backbone"):
        config.backbone = hub_repo_id(config.backbone)  # the card names it too
    summary = checkpoint / "train_summary.json"  # what `geoloc train` ran: the card's base_model and datasets
    training_run = json.loads(summary.read_text()).get("args", {}) if summary.is_file() else None
    render_model_card(config, repo_id, results, training_data, license, training_run).save(staging / "README.md")
    files["README.md"] = staging / "README.md"
    for metrics in results:
        record = eval_record(metrics)
        path = staging / "eval_results" / f"{record['dataset'].replace('/', '--')}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        files[f"eval_results/{path.name}"] = path
    return dict(sorted(files.items()))


def write_local_repo(checkpoint, repo_id: str, output_dir, **options) -> list[str]:
    """Write the files `publish` would upload to `output_dir` (absent or empty) instead, with no network; returns
    their paths in the repo. `options` as for `hub_files`."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"--local-dir '{output_dir}' must be a new or empty folder, so it holds exactly the repo.")
    with tempfile.TemporaryDirectory(prefix="geoloc-publish-") as staging:
        files = hub_files(checkpoint, repo_id, staging, **options)
        for name, source in files.items():
            (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, output_dir / name)
    return list(files)


def publish(model, repo_id: str, *, image_processor=None, eval_dirs=(), private: bool = False,
            revision: str | None = None, create_pr: bool = False, space_id: str | None = None,
            training_data: str = DEFAULT_TRAINING_DATA, token: str | None = None,
            api: HfApi | None = None) -> dict:
    """Push a checkpoint with its card, remote code and results to `repo_id` (and the Space to `space_id`).

    Args:
        model: a checkpoint folder written by `save_pretrained` (only `checkpoint_files` of it are uploaded), or
            a model object (then `image_processor` is required; both are saved with `save_pretrained`, gallery /
            cell table included).
        repo_id: the model repo, `namespace/name`; created if missing.
        eval_dirs: `geoloc evaluate` output folders whose metrics go into the card and `eval_results/`.
        private, revision, create_pr: passed to `create_repo` / `create_commit`.
        space_id: also push the Gradio Space (as `geoloc space` assembles it) to this repo id.
        api: the `HfApi` to use (default: one with `token`).

    Returns:
        `{"model": CommitInfo, "space": CommitInfo or None}`.

    Raises:
        ValueError: as `hub_files`, or on a model object without image processor.

    Example:
        >>> publish("runs/geoclip-tiny", "me/geoclip-tiny", eval_dirs=["eval/im2gps3k"])  # doctest: +SKIP
    """
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="geoloc-publish-") as staging:
        staging = Path(staging)
        if isinstance(model, (str, os.PathLike)):
            checkpoint = Path(model)
        else:
            if image_processor is None:
                raise ValueError("Publishing a model object needs its image_processor (saved next to it).")
            checkpoint = staging / "checkpoint"
            model.save_pretrained(checkpoint)
            image_processor.save_pretrained(checkpoint)
        files = hub_files(checkpoint, repo_id, staging / "repo", eval_dirs=eval_dirs, training_data=training_data)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        model_commit = api.create_commit(
            repo_id, operations, commit_message="Upload checkpoint, model card and evaluation results with geoloc",
            repo_type="model", revision=revision, create_pr=create_pr,
        )
        space_commit = None
        if space_id is not None:
            from .space import export_space

            space = export_space(staging / "space")
            space_card = SpaceCard.load(space / "README.md")
            space_card.data.models = [repo_id]
            space_card.save(space / "README.md")
            operations = _folder_operations(space)
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            space_commit = api.create_commit(
                space_id, operations, commit_message=f"Deploy the geolocation demo of {repo_id} with geoloc",
                repo_type="space", create_pr=create_pr,
            )
            api.add_space_variable(space_id, "GEOLOC_MODEL", repo_id)
    return {"model": model_commit, "space": space_commit}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc publish",
        description="Push a checkpoint, its model card and evaluation results (and the demo Space) to the Hub.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model_dir", help="checkpoint folder written by save_pretrained / geoloc train")
    parser.add_argument("--repo-id", required=True, help="model repo, namespace/name (created if missing)")
    parser.add_argument("--eval-dir", action="append", default=[],
                        help="a `geoloc evaluate` --output-dir (repeat for several benchmarks)")
    parser.add_argument("--private", action="store_true", help="create private repos")
    parser.add_argument("--revision", default=None, help="branch to commit to")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--space", action="store_true", help="also deploy the Gradio Space (see `geoloc space`)")
    parser.add_argument("--space-id", default=None, help="Space repo id (default: <repo-id>-demo)")
    parser.add_argument("--training-data", default=DEFAULT_TRAINING_DATA,
                        help="what the checkpoint was trained on (a sentence or two for the card)")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    parser.add_argument("--local-dir", default=None,
                        help="write the files the model repo would receive to this new folder instead (no network)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.space_id and not args.space:
        parser.error("--space-id needs --space")
    if args.local_dir is not None:
        if args.space or args.private or args.revision or args.create_pr:
            parser.error("--local-dir writes the model repo only: it takes no --space, --private, --revision or "
                         "--create-pr (assemble the Space with `geoloc space`)")
        names = write_local_repo(args.model_dir, args.repo_id, args.local_dir, eval_dirs=args.eval_dir,
                                 training_data=args.training_data)
        print(f"wrote {len(names)} files to {args.local_dir}: {', '.join(names)}")
        return 0
    space_id = (args.space_id or f"{args.repo_id}-demo") if args.space else None
    commits = publish(
        args.model_dir, args.repo_id, eval_dirs=args.eval_dir, private=args.private, revision=args.revision,
        create_pr=args.create_pr, space_id=space_id, training_data=args.training_data, token=args.token,
    )
    for kind, commit in commits.items():
        if commit is not None:
            print(f"{kind}: {commit.pr_url or commit.commit_url}")
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    run_command("publish")
