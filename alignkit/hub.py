"""Publishing to the Hugging Face Hub, without prompts and without secrets.

The token comes from HF_TOKEN (or `.env`, or a cached `huggingface-cli login`); a missing token is an error
raised before any training starts, never an interactive prompt.
"""

from __future__ import annotations

from pathlib import Path

from . import logger

# Never uploaded: intermediate state, and anything that could hold credentials.
IGNORE = ["checkpoint-*", "*.previous-*", ".env", "*.env", "wandb/*", "runs/*"]


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN, then the token file of a `huggingface-cli login`
    if not token:
        raise ValueError("pushing to the Hub needs a token: set HF_TOKEN in the environment or in .env")
    return token


def push(folder, repo_id: str, private: bool = True) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=require_token())
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(Path(folder)), repo_id=repo_id, repo_type="model", ignore_patterns=IGNORE)
    logger.info(f"pushed {folder} to {url} ({'private' if private else 'public'})")
    return str(url)
