"""Push an exported directory to the Hugging Face Hub. The token comes from HF_TOKEN or the login cache
(`hf auth login`) and is handed to huggingface_hub only: never printed, logged or written anywhere."""

from __future__ import annotations

import logging
from pathlib import Path

from hybridlm.export.formats import ExportError

log = logging.getLogger(__name__)


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login` before --push-to-hub")
    return token


def check_push_target(repo_id: str) -> str:
    """Fail before any work when the repo id is malformed or no token is available; returns the token."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--push-to-hub {repo_id!r}: give the repository as ORG/NAME")
    return require_token()


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """create_repo (exist_ok) + upload_folder; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=check_push_target(repo_id))
    url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Upload model exported with hybridlm")
    log.info("pushed %s to %s", folder, url)
    return str(url)
