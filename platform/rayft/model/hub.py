"""`rayft export --push-to-hub REPO`: an exported directory to a Hugging Face model repo, with
huggingface_hub (create the repo if needed, then one commit of the folder).

The token comes from the environment (HF_TOKEN, or HUGGING_FACE_HUB_TOKEN), else from
`hf auth login`'s saved token; it is passed to the library and never printed or written. The
endpoint is huggingface_hub's (HF_ENDPOINT, for a mirror or a private hub).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayft.errors import ModelError
from rayft.spec.secrets import redact_text

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True)
class Pushed:
    repo_id: str
    commit_url: str
    files: int


def hub_token() -> str:
    """A write token for the hub, from the environment or a saved login."""
    for name in TOKEN_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ModelError(
            "--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN in the environment "
            "(or run `hf auth login`)"
        )
    return token


def push_to_hub(folder: str, repo_id: str, *, private: bool = False, message: str | None = None) -> Pushed:
    """Upload every file of `folder` to the model repo `repo_id` (created when missing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ModelError(f"--push-to-hub {repo_id!r}: {exc}") from None
    files = sum(len(names) for _, _, names in os.walk(folder))
    api = HfApi(token=hub_token())
    try:
        repo = api.create_repo(repo_id, private=private or None, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo.repo_id,
            repo_type="model",
            commit_message=message or "Upload from rayft export",
        )
    except OfflineModeIsEnabled:
        raise ModelError(
            f"cannot push to {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); unset it "
            f"to push, or upload later with `hf upload {repo_id} {folder}`"
        ) from None
    except (HfHubHTTPError, Exception) as exc:  # HTTP statuses, and a hub that cannot be reached
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(redact_text(f"pushing {folder} to {repo_id} failed: {type(exc).__name__}: {first}")) from None
    return Pushed(repo.repo_id, str(commit.commit_url), files)
