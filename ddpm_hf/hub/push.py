"""Pushing a saved pipeline to the Hugging Face Hub: the pipeline, its card and its samples, nothing else."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import httpx2
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from ..pipelines.fast_sampler import SWEEP_FILE
from .card import CARD_NAME, EVAL_RESULTS_FILE, sample_images, write_model_card

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)
T = TypeVar("T")

COMPONENT_CONFIGS = {"unet": "config.json", "scheduler": "scheduler_config.json"}  # a DDPM pipeline's parts
COMPONENT_SUFFIXES = (".json", ".safetensors")  # configs and weights; never .bin pickles
DEFAULT_COMMIT_MESSAGE = "Upload DDPM pipeline"
# Seconds to wait before each new try of a request that failed transiently: 5 tries in all, 15 s of waiting.
RETRY_DELAYS_SECONDS = (1.0, 2.0, 4.0, 8.0)
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)  # the Hub overloaded, restarting or rate-limiting
_CUT_CONNECTIONS = (httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError, httpx2.ReadTimeout,
                    httpx2.WriteTimeout)  # a reset or dropped connection, once connected


class HubPushError(RuntimeError):
    """The Hub could not be reached or refused the upload; the local files are intact."""


def push_to_hub(
    folder_or_pipeline: str | os.PathLike | DiffusionPipeline,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> CommitInfo:
    r"""
    Uploads a saved pipeline, its model card and its sample images to a Hub repo, creating the repo if needed.

    Only `model_index.json`, `unet/` and `scheduler/` (configs and safetensors weights), `README.md`, the evaluation
    and sampler-sweep records and the images at the top of the folder are uploaded: never checkpoints, optimizer
    states, logs or training arguments. The card is (re)generated first, with usage snippets that load `repo_id`,
    unless the folder holds a hand-written one. Everything is checked before the first request. The upload is one
    commit: the repo shows the whole pipeline or none of it, even if the process is killed midway. Transient failures
    (5xx answers, 429, a reset connection) are retried after 1, 2, 4 and 8 s; when the Hub still fails the local files
    are intact, and running the same push again finishes it without re-sending what already arrived.

    Args:
        folder_or_pipeline (`str`, `os.PathLike` or [`~diffusers.DiffusionPipeline`]): A folder written by
            `save_pretrained` (a training run's `--output_dir`), or a pipeline, saved to a temporary folder first.
        repo_id (`str`): `"user/name"` or `"org/name"`; a bare `"name"` goes under the token's user.
        private (`bool`, *optional*): Create the repo as private. `None`: public, or as the owner's default
            says. Ignored if the repo exists.
        token (`str`, *optional*): A token with write access. Defaults to `HF_TOKEN`, then the stored login
            (`hf auth login`). It is sent to the Hub only, never printed, logged or written.
        commit_message (`str`, *optional*): Defaults to `"Upload DDPM pipeline"`.
        revision (`str`, *optional*): The branch to commit to (created from `main` if it does not exist);
            defaults to `main`.

    Returns:
        [`~huggingface_hub.CommitInfo`]: `.oid` is the commit id (load it back with `revision=`), `.repo_url.repo_id`
        the full repo id.

    Raises:
        ValueError: if `repo_id` is invalid, no token is available, or the folder is not a saved pipeline.
        HubPushError: if the Hub cannot be reached or refuses the upload.

    Example:

    ```py
    >>> from ddpm_hf.hub import push_to_hub
    >>> commit = push_to_hub("outputs/ddpm-digits", "alice/ddpm-digits", private=True)
    >>> commit.oid  # DDPMPipeline.from_pretrained("alice/ddpm-digits", revision=commit.oid) loads this upload
    ```
    """
    token = check_can_push(repo_id, token)
    if not isinstance(folder_or_pipeline, (str, os.PathLike)):  # a pipeline
        with tempfile.TemporaryDirectory() as folder:
            folder_or_pipeline.save_pretrained(folder, safe_serialization=True)
            return _push_folder(Path(folder), repo_id, private, token, commit_message, revision)
    return _push_folder(Path(folder_or_pipeline), repo_id, private, token, commit_message, revision)


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """Checks, without any request, that `repo_id` is valid and a token is available; returns the token.

    Call it before training with `--push_to_hub`, so a typo costs nothing.
    """
    validate_repo_id(repo_id)  # raises HFValidationError, a ValueError naming the rule broken
    token = token or get_token()
    if not token:
        raise ValueError(
            f"Pushing to '{repo_id}' needs a Hugging Face token with write access: pass one (`token=` or "
            "`--hub_token`), set the HF_TOKEN environment variable, or log in once with `hf auth login`."
        )
    return token


def check_saved_pipeline(folder: str | os.PathLike) -> None:
    """Raises a `ValueError` listing what is missing if `folder` is not a pipeline saved in safetensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the --output_dir of a training run or a saved pipeline.")
    problems = []
    if not (folder / "model_index.json").is_file():
        problems.append("model_index.json is missing")
    else:
        try:
            model_index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
            problems += [f"model_index.json has no '{name}' entry" for name in COMPONENT_CONFIGS
                         if name not in model_index]
        except json.JSONDecodeError as error:
            problems.append(f"model_index.json is not valid JSON ({error})")
    for component, config_name in COMPONENT_CONFIGS.items():
        if not (folder / component / config_name).is_file():
            problems.append(f"{component}/{config_name} is missing")
    if not any((folder / "unet").glob("*.safetensors")):
        pickles = any((folder / "unet").glob("*.bin"))
        problems.append("unet/ has no .safetensors weights" + (" (only .bin: re-save with safe_serialization=True)"
                                                               if pickles else ""))
    if problems:
        raise ValueError(f"{folder} is not a saved DDPM pipeline: {'; '.join(problems)}. Save one with "
                         "`pipe.save_pretrained(folder)`; a training run writes it to its --output_dir at the end.")


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """The folder's files that belong on the Hub, as repo paths: the pipeline (with the fast sampler's config), the
    card, the sample-quality and sampler-sweep records and the images (samples, the sweep's curve)."""
    folder = Path(folder)
    paths = ["model_index.json"]
    for component in COMPONENT_CONFIGS:
        paths += sorted(f"{component}/{path.name}" for path in (folder / component).iterdir()
                        if path.is_file() and path.suffix in COMPONENT_SUFFIXES)
    paths += [name for name in (CARD_NAME, EVAL_RESULTS_FILE, SWEEP_FILE) if (folder / name).is_file()]
    return paths + sample_images(folder)


def create_hub_repo(repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Creates the Hub repo, or finds it, and returns its full id (a bare name goes under the token's user).

    It checks the id and the token offline first: training with `--push_to_hub` calls it before spending any
    compute. Raises `ValueError` or [`HubPushError`] as [`push_to_hub`] does.
    """
    token = check_can_push(repo_id, token)
    api = HfApi(token=token)
    with _explained_errors(api, repo_id, token):
        return _retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True).repo_id, repo_id, token)


def _push_folder(folder: Path, repo_id: str, private: bool | None, token: str, commit_message: str | None,
                 revision: str | None) -> CommitInfo:
    check_saved_pipeline(folder)
    repo_id = create_hub_repo(repo_id, private=private, token=token)
    write_model_card(folder, repo_id)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
                  for path in files_to_upload(folder)]
    api = HfApi(token=token)
    with _explained_errors(api, repo_id, token, folder):
        if revision not in (None, "main"):
            _retrying(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), repo_id, token)
        # One commit (its uploads are skipped on a retry when the Hub already has them).
        return _retrying(lambda: api.create_commit(repo_id, operations, revision=revision,
                                                   commit_message=commit_message or DEFAULT_COMMIT_MESSAGE),
                         repo_id, token)


def _retrying(request: Callable[[], T], repo_id: str, token: str) -> T:
    """`request()`, tried again after each of `RETRY_DELAYS_SECONDS` while the Hub fails transiently."""
    for attempt, delay in enumerate(RETRY_DELAYS_SECONDS, start=1):
        try:
            return request()
        except (HfHubHTTPError, httpx2.TransportError) as error:
            if not _is_transient(error):
                raise
            reason = f"{type(error).__name__}: {error}".splitlines()[0].replace(token, "<token>")
            logger.warning(f"The Hub failed on the push to '{repo_id}' ({reason}); trying again in {delay:g} s "
                           f"({attempt} of {len(RETRY_DELAYS_SECONDS)} retries).")
            time.sleep(delay)
    return request()


def _is_transient(error: Exception) -> bool:
    """A failure that a later try may not meet: an overloaded or restarting Hub, a connection cut midway (not a
    refused connection or an unknown host: those mean the Hub cannot be reached at all)."""
    if isinstance(error, HfHubHTTPError):
        return getattr(error.response, "status_code", None) in TRANSIENT_STATUSES
    return isinstance(error, _CUT_CONNECTIONS)


@contextmanager
def _explained_errors(api: HfApi, repo_id: str, token: str, folder: Path | None = None) -> Iterator[None]:
    """Turns the Hub's refusals and network failures into a `HubPushError` that says what to do, token-free."""
    try:
        yield
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as error:
        reason = str(error).replace(token, "<token>")  # in case a server echoes what it was sent
        intact = f"The files in {folder} are intact. " if folder is not None else ""
        raise HubPushError(
            f"The Hub at {api.endpoint} did not take the push to '{repo_id}': {_explain(error)}{reason}\n"
            f"{intact}Run the same push again to retry: files that already reached the Hub are not sent twice."
        ) from None  # the original error is in the message, scrubbed; chained, it would repeat unscrubbed


def _explain(error: Exception) -> str:
    """A first line saying what to do about the usual failures."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode is on (unset HF_HUB_OFFLINE to push).\n"
    if status == 401:
        return "the Hub refused the token (invalid or expired?).\n"
    if status == 403:
        return "the token has no write access to this namespace.\n"
    if status is None:
        return "the Hub could not be reached.\n"
    return ""
