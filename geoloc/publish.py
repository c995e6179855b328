"""`geoloc publish`: push a checkpoint, its model card and its evaluation results to the Hugging Face Hub,
and optionally the Gradio Space that demos it.

What the model repo receives, in one commit: the checkpoint folder as `save_pretrained` wrote it (config,
weights with the GeoCLIP gallery or the GeoHier cell table, `preprocessor_config.json`, tokenizer files),
`README.md` rendered from `hub_cards/<model_type>.md` with `huggingface_hub.ModelCard` (its YAML carries a
`model-index` entry for every benchmark x metric of the given `geoloc evaluate` folders), and
`eval_results/<dataset>.json` (each folder's metrics.json). With `--space`, the Space repo receives what
`geoloc space` assembles (`spaces/geolocation/` plus the package sources), its README's YAML (the Space
card of `spaces/geolocation/README.md`) gains `models: [<repo-id>]`, and its `GEOLOC_MODEL` variable is
set to the model repo, which the app loads.

Example:
    geoloc publish ./checkpoints/geoclip --repo-id me/geoclip-vit-l14 --eval-dir eval/im2gps3k \\
        --eval-dir eval/yfcc4k --space
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import jinja2
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, SpaceCard
from transformers import AutoConfig

from .benchmarks import BENCHMARKS
from .metrics import DEFAULT_THRESHOLDS_KM, threshold_key

REPO_ROOT = Path(__file__).resolve().parents[1]
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
SKIPPED_NAMES = {"__pycache__", ".git", ".cache", ".gitattributes"}


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


def render_model_card(config, repo_id: str, results: list[dict], training_data: str = DEFAULT_TRAINING_DATA,
                      license: str = "mit") -> ModelCard:
    """Render `hub_cards/<config.model_type>.md` for `repo_id` with the given `geoloc evaluate` results.

    Raises:
        ValueError: when there is no card template for the model type.
    """
    template = _template(f"{config.model_type}.md")
    rows = [{"title": _dataset_ids(metrics["dataset"])[0], "n_unreadable": metrics.get("n_unreadable", 0),
             **{key: _metric_value(metrics, key) for key in METRIC_NAMES}, "n": metrics["n"]} for metrics in results]
    results_section = jinja2.Template(_template("_results.md.jinja").read_text()).render(results=rows)
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        tags=["image-geolocation", "geolocation", config.model_type, "geoloc"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(results) or None,
    )
    return ModelCard.from_template(
        card_data, template_path=str(template), model_name=repo_id.split("/")[-1], repo_id=repo_id, config=config,
        training_data=training_data, results_section=results_section,
    )


def _folder_operations(folder: Path, skip=()) -> list[CommitOperationAdd]:
    """One `CommitOperationAdd` per file under `folder` (sorted), leaving out caches, VCS files and `skip`."""
    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not SKIPPED_NAMES & set(relative.parts) and relative.as_posix() not in skip:
            operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=str(path)))
    return operations


def publish(model, repo_id: str, *, image_processor=None, eval_dirs=(), private: bool = False,
            revision: str | None = None, create_pr: bool = False, space_id: str | None = None,
            training_data: str = DEFAULT_TRAINING_DATA, token: str | None = None,
            api: HfApi | None = None) -> dict:
    """Push a checkpoint with its card and results to `repo_id` (and the Space to `space_id`).

    Args:
        model: a checkpoint folder written by `save_pretrained`, or a model object (then `image_processor`
            is required; both are saved with `save_pretrained`, gallery / cell table included).
        repo_id: the model repo, `namespace/name`; created if missing.
        eval_dirs: `geoloc evaluate` output folders whose metrics go into the card and `eval_results/`.
        private, revision, create_pr: passed to `create_repo` / `create_commit`.
        space_id: also push the Gradio Space (as `geoloc space` assembles it) to this repo id.
        api: the `HfApi` to use (default: one with `token`).

    Returns:
        `{"model": CommitInfo, "space": CommitInfo or None}`.

    Raises:
        ValueError: on a folder without config.json, a model object without image processor, or bad eval dirs.
    """
    api = api or HfApi(token=token)
    results = load_eval_results(eval_dirs)
    with tempfile.TemporaryDirectory(prefix="geoloc-publish-") as staging:
        staging = Path(staging)
        if isinstance(model, (str, os.PathLike)):
            checkpoint = Path(model)
            if not (checkpoint / "config.json").is_file():
                raise ValueError(f"'{checkpoint}' is not a checkpoint folder: it has no config.json.")
        else:
            if image_processor is None:
                raise ValueError("Publishing a model object needs its image_processor (saved next to it).")
            checkpoint = staging / "checkpoint"
            model.save_pretrained(checkpoint)
            image_processor.save_pretrained(checkpoint)
        config = AutoConfig.from_pretrained(checkpoint)
        extras = staging / "extras"
        (extras / "eval_results").mkdir(parents=True)
        render_model_card(config, repo_id, results, training_data).save(extras / "README.md")
        for metrics in results:
            name = _dataset_ids(metrics["dataset"])[1].replace("/", "--")
            with open(extras / "eval_results" / f"{name}.json", "w") as handle:
                json.dump(metrics, handle, indent=2)
        operations = _folder_operations(checkpoint, skip={"README.md"}) + _folder_operations(extras)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        model_commit = api.create_commit(
            repo_id, operations, commit_message="Upload checkpoint, model card and evaluation results with geoloc",
            repo_type="model", revision=revision, create_pr=create_pr,
        )
        space_commit = None
        if space_id is not None:
            from .space import export_space  # needs the `space` extra (reverse_geocode); only for --space

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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.space_id and not args.space:
        parser.error("--space-id needs --space")
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
    sys.exit(main())
