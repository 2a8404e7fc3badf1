"""Upload a finished output directory to the Hugging Face Hub in one commit.

Used by `scripts/push_to_hub.py` and by the `--push_to_hub` flags of the other scripts, always *after* the
directory has been written and verified, so a failed upload loses nothing: the folder is only read.

`push_folder_to_hub` creates the repository (no error when it exists), creates the branch when a revision other
than `main` is asked for, and sends every file of the folder in a single `HfApi.create_commit` (pre-upload, then
commit). `upload_folder` is not used because, with `hf_xet` installed, it may split a large folder into several
commits ("part 2", ...). Offline mode, a missing token and an unreachable endpoint raise `HubUploadError` saying
what to do.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo

logger = logging.getLogger(__name__)

# Never uploaded: VCS data, Python caches, and the local cache huggingface_hub keeps inside uploaded folders.
IGNORED_PARTS = {".git", "__pycache__", ".cache", ".ipynb_checkpoints"}
IGNORED_SUFFIXES = (".pyc", ".lock")


# huggingface_hub's HTTP client, whose transport errors (DNS, refused connection, timeout) mean "no network":
# `httpx` in huggingface_hub 1.x, `httpx2` in 2.x. huggingface_hub has no public class for them.
HTTP_CLIENT_MODULES = ("httpx2", "httpx")


def http_transport_errors() -> tuple[type[BaseException], ...]:
    """The `TransportError` classes of the HTTP clients importable here (see `HTTP_CLIENT_MODULES`), plus the
    built-in `ConnectionError`; whichever one huggingface_hub uses is among them."""
    errors: list[type[BaseException]] = []
    for name in HTTP_CLIENT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # not the client of this huggingface_hub version
        errors.append(module.TransportError)
    return (*errors, ConnectionError)


class HubUploadError(RuntimeError):
    """The upload could not be done; the message says why and how to retry. The local folder is untouched."""


def files_to_upload(folder: str | Path, exclude: Sequence[str] = ()) -> list[str]:
    """Relative POSIX paths of the files `push_folder_to_hub` sends, sorted. `exclude` holds glob patterns matched
    against each path's top-level entry (e.g. `"checkpoint-*"` leaves resumable training states out)."""
    folder = Path(folder)
    paths = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or IGNORED_PARTS.intersection(relative.parts) or path.name.endswith(IGNORED_SUFFIXES):
            continue
        if any(fnmatch.fnmatch(relative.parts[0], pattern) for pattern in exclude):
            continue
        paths.append(relative.as_posix())
    return paths


def _retry_hint(folder: Path, repo_id: str, revision: str | None, private: bool | None) -> str:
    command = f"python scripts/push_to_hub.py {folder} --repo_id {repo_id}"
    if revision:
        command += f" --revision {revision}"
    if private:
        command += " --private"
    return f"Nothing was uploaded and {folder} is unchanged; retry later with:\n  {command}"


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    exclude: Sequence[str] = (),
) -> CommitInfo:
    """Upload every file of `folder` to the model repo `repo_id` in one commit.

    Args:
        folder: a directory written by this project's scripts (weights, config, README.md model card, ...).
        repo_id: `"user_or_org/name"`; created if missing (`private` applies only then).
        revision: branch to commit to (created from `main` if missing); default `main`.
        commit_message: defaults to `"Upload <folder name> (<n> files)"`.
        token: defaults to the saved login / `HF_TOKEN`. endpoint: defaults to `HF_ENDPOINT` / huggingface.co.
        exclude: glob patterns of top-level entries not to upload (see `files_to_upload`).
    Returns:
        `huggingface_hub.CommitInfo` (`.commit_url`, `.oid`).
    Raises:
        `HubUploadError` for offline mode, no token, an unreachable endpoint or an HTTP error (message says what to
        do); `FileNotFoundError`/`ValueError` for a missing or empty folder.
    """
    folder = Path(folder)
    paths = checked_upload_files(folder, exclude)
    hint = _retry_hint(folder, repo_id, revision, private)
    token = checked_token(repo_id, token, hint)
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {folder.resolve().name} ({len(paths)} files)"
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in paths]
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            commit_description=commit_description,
            revision=revision,
            repo_type="model",
        )
    except HfHubHTTPError as error:  # the server answered (checked first: it is an OSError too)
        raise refused_upload_error(error, repo_id, hint) from error
    except http_transport_errors() as error:
        raise HubUploadError(
            f"Cannot reach the Hub at {api.endpoint} ({type(error).__name__}: {error}). Check the network or "
            f"HF_ENDPOINT. {hint}"
        ) from error
    logger.info("Uploaded %d files of %s to %s: %s", len(paths), folder, repo_url, info.commit_url)
    return info


__all__ = ["HubUploadError", "files_to_upload", "http_transport_errors", "push_folder_to_hub"]


def checked_upload_files(folder: Path, exclude: Sequence[str]) -> list[str]:
    """The files to upload (see `files_to_upload`); a missing or empty folder is refused, a missing card warned."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; write the model there first (save_pretrained).")
    paths = files_to_upload(folder, exclude)
    if not paths:
        raise ValueError(f"{folder} holds no files to upload.")
    if "README.md" not in paths:
        logger.warning("%s has no README.md: the repo will have no model card (see modeling_ijepa.cards).", folder)
    return paths


def checked_token(repo_id: str, token: str | None, hint: str) -> str:
    """The token to upload with; offline mode or no token is a `HubUploadError` saying what to do."""
    if constants.HF_HUB_OFFLINE:  # (huggingface_hub 1.0 has no is_offline_mode())
        raise HubUploadError(
            f"Cannot upload to {repo_id}: Hugging Face offline mode is on (HF_HUB_OFFLINE=1). Unset it on a machine "
            f"with network access. {hint}"
        )
    token = token or get_token()
    if not token:
        raise HubUploadError(
            f"Cannot upload to {repo_id}: no Hugging Face token. Log in with `hf auth login` or set HF_TOKEN to a "
            f"token with write access (https://huggingface.co/settings/tokens). {hint}"
        )
    return token


def refused_upload_error(error: HfHubHTTPError, repo_id: str, hint: str) -> HubUploadError:
    status = error.response.status_code if error.response is not None else "?"
    advice = {
        401: "the token was rejected: log in again (`hf auth login`) or set a valid HF_TOKEN",
        403: f"the token may not write to {repo_id}: use a write token or a namespace you own",
    }.get(status, "read the server's message")
    return HubUploadError(
        f"The Hub refused the upload to {repo_id} (HTTP {status}): {advice}.\nServer said: {error}\n{hint}"
    )
