"""Push an exported directory to the Hugging Face Hub. The token comes from HF_TOKEN or the login cache
(`hf auth login`) and is handed to huggingface_hub only: never printed, logged or written anywhere.

A successful push leaves PUSH_RECORD in the export (never uploaded itself), so a rerun knows whether a push that
failed half-way still has to be made: `pushed_to(folder)`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hybridlm.checkpoint.formats import ExportError

log = logging.getLogger(__name__)

PUSH_RECORD = ".hub_push.json"


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login` before --push-to-hub")
    return token


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--push-to-hub {repo_id!r}: give the repository as ORG/NAME")


def check_push_target(repo_id: str) -> str:
    """Fail before any work when the repo id is malformed, no token is available or huggingface_hub is offline;
    returns the token."""
    import huggingface_hub

    check_repo_id(repo_id)
    token = require_token()
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network "
                          "request; unset HF_HUB_OFFLINE to push, or export without pushing")  # fmt: skip
    return token


def pushed_to(folder: Path) -> str | None:
    """The repo id `folder` was last pushed to in full, None if it never was."""
    try:
        return json.loads((Path(folder) / PUSH_RECORD).read_text())["repo_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """create_repo (exist_ok) + upload_folder, then PUSH_RECORD; returns the repo URL. Any failure of the upload
    becomes an ExportError that says the folder was not pushed and how to retry."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi(token=check_push_target(repo_id))
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload model exported with hybridlm", ignore_patterns=[PUSH_RECORD])
    except Exception as error:  # network, HTTP status, offline mode, quota, ...: the export itself is complete
        raise ExportError(
            f"{folder} is exported but was NOT pushed to {repo_id}: {type(error).__name__}: {error}. Retry with "
            f"`hf upload {repo_id} {folder} --repo-type model`, or rerun the training run, which retries the push"
        ) from error
    record = folder / f"{PUSH_RECORD}.tmp"
    record.write_text(json.dumps({"repo_id": repo_id, "url": str(url), "commit": commit.oid}) + "\n")
    os.replace(record, folder / PUSH_RECORD)
    log.info("pushed %s to %s", folder, url)
    return str(url)
