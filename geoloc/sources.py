"""Is this argument a local path or a Hugging Face Hub id? One rule for `--model`, `--dataset` and `--data-dir`.

A string that exists on disk is local. A string that does not is sent to the Hub only when it is a valid repo id
(`name` or `namespace/name`); anything else that looks like a path (`./x`, `../x`, `/abs/x`, `a/b/c`, `~/x`, a
backslash) fails at once with "no such folder", instead of a Hub lookup that retries for half a minute and
then says it could not reach the Hub. Light: no torch, transformers or datasets (`geoloc predict --help`).

Example:
    >>> is_hub_id("me/geoclip"), is_hub_id("./runs/geoclip"), is_hub_id("runs/geoclip/final")
    (True, False, False)
"""

import glob
import os


def is_hub_id(source: str) -> bool:
    """Whether `source` is a valid Hub repo id (`name` or `namespace/name`; never `.`-prefixed or a path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "~")) or "\\" in source:
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def hub_repo_id(value) -> str | None:
    """`value` when it can only mean a Hub repo (a valid repo id that names no local path), else None: a local
    folder, a path-like string or a non-string. What may be published as a source (`backbone`, `datasets`).

    Example:
        >>> hub_repo_id("openai/clip-vit-base-patch32"), hub_repo_id("/home/alice/private/clip-tiny")
        ('openai/clip-vit-base-patch32', None)
    """
    if not isinstance(value, str) or os.path.exists(value) or not is_hub_id(value):
        return None
    return value


def check_local_or_hub(source, option: str, *, hub: bool = True, patterns: bool = False) -> str:
    """`source` as a string, checked: it exists locally, or (with `hub`) it is a Hub repo id, or (with
    `patterns`) it is a glob that matches files (dataset shards such as `data/*.parquet`).

    Raises:
        ValueError: `"{option} '{source}': no such folder ..."` for anything else.
    """
    source = os.fspath(source)
    if os.path.exists(source) or (hub and is_hub_id(source)) or (patterns and glob.has_magic(source)
                                                                  and glob.glob(source)):
        return source
    hint = " (a Hub id looks like 'namespace/name')" if hub else ""
    raise ValueError(f"{option} '{source}': no such folder{hint}.")


__all__ = ["check_local_or_hub", "hub_repo_id", "is_hub_id"]
