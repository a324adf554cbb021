"""The Hugging Face Hub side of `surgery publish`: repository id, token, and the upload itself.

The upload is `HfApi.create_repo(exist_ok=True)` then one `HfApi.upload_folder` (one Hub commit: all files or
none). Every failure becomes a SurgeryError that names the fix and says what state the Hub is left in.
The endpoint is `HF_ENDPOINT` when set (read at call time), else huggingface_hub's default.
"""

from __future__ import annotations

import os
from pathlib import Path

from surgery.errors import SurgeryError

TOKEN_HELP = "log in with `hf auth login` (or `huggingface-cli login`) using a token with write access, or set HF_TOKEN"


def check_repo_id(repo_id: str) -> None:
    """OWNER/NAME as the Hub accepts it (huggingface_hub's own validator), else SurgeryError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise SurgeryError(f"invalid repo id {repo_id!r}: {str(err).rstrip('.')}. Expected OWNER/NAME, e.g. my-user/gpt2-ln-free") from err
    if repo_id.count("/") != 1:
        raise SurgeryError(f"invalid repo id {repo_id!r}: expected OWNER/NAME (your user or organization name, a slash, "
                           "the model's name), e.g. my-user/gpt2-ln-free")


def resolve_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else the token saved by `hf auth login`; SurgeryError if there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise SurgeryError(f"no Hugging Face token found: {TOKEN_HELP}. Nothing was uploaded")
    return token


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check else constants.HF_HUB_OFFLINE)


def _explain(err: Exception, url: str) -> str:
    """A user-facing sentence for a failed Hub request."""
    from huggingface_hub.utils import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return f"the Hub at {url} rejected the token (401 Unauthorized): {TOKEN_HELP}"
        if status == 403:
            return f"the token may not write there (403 Forbidden): use a write token of the repo's owner, or another OWNER"
        return f"the Hub at {url} answered {status}: {str(err).splitlines()[0]}"
    name = type(err).__name__
    if any(k in name for k in ("Connect", "Timeout", "Network", "Transport", "Protocol")) or isinstance(err, OSError):
        return f"could not reach the Hugging Face Hub at {url} ({name}: {err}); check the network connection and HF_ENDPOINT"
    return f"the upload to {url} failed ({name}: {err})"


def upload(folder: Path, repo_id: str, token: str, private: bool = False, revision: str | None = None,
           commit_message: str = "Upload with surgery publish") -> dict:
    """Create `repo_id` (if needed) and commit every file of `folder` to it in one commit.

    Returns {"repo_url", "commit_url", "commit", "revision"}. Raises SurgeryError; a failed commit leaves the
    repository without any of these files (the Hub applies a commit whole or not at all).
    """
    from huggingface_hub import HfApi

    url = endpoint()
    if _offline():
        raise SurgeryError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so the Hub cannot be reached: unset it "
                           "to upload, or use --dry-run DIR to only write the folder. Nothing was uploaded")
    api = HfApi(endpoint=url, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as err:
        raise SurgeryError(f"could not create {repo_id}: {_explain(err, url)}. Nothing was uploaded") from err
    try:
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except Exception as err:
        raise SurgeryError(f"uploading to {repo_id} failed: {_explain(err, url)}. The repository {repo_url} exists, "
                           "but this upload was not committed to it (a Hub commit is all or nothing); run the same "
                           "command again to retry") from err
    return {"repo_url": str(repo_url), "commit_url": info.commit_url, "commit": info.oid, "revision": revision or "main"}
