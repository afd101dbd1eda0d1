"""Publishing to the Hugging Face Hub: the upload (with the model card of alignkit.core.card), and never a prompt or
a secret.

The token comes from HF_TOKEN (or `.env`, or a cached `huggingface-cli login`); a missing token is an error
raised before any training or merging starts, never an interactive prompt. Repos are private unless asked.
An adapter is pushed only when its base is on the Hub: a config naming a local path loads nowhere else.

`require_reachable` (alignkit.core.sources, importable from here) asks the Hub once, with a short timeout, before
anything is fetched from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import UserError
from alignkit.core.journal import read_json as _read_json
from alignkit.core.sources import HubUnreachable, is_hub_id, require_reachable  # noqa: F401 - re-exported

# A run or checkpoint folder's files that are no part of its model: the Trainer's state (training_args.bin keeps
# every TrainingArguments field) and alignkit's records of the run, which name local paths. No loader reads them
# (alignkit.modeling.lineage compares a model without them).
TRAINER_STATE = ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json",
                 "training_args.bin"]
RUN_RECORDS = ["alignkit_config.json", "merge.json", "alignkit_failed.txt", "alignkit_claim.json"]
# Never uploaded: intermediate state, anything that could hold credentials, and the files above (pushed from a
# checkpoint-N folder itself too; the card tells what the records hold, without them).
# In any subfolder too (the Hub matches a pattern against the whole path): a merge's records in a folder of its own,
# a merge cut short (.merged.partial/), a replaced one (.merged.replaced/).
IGNORE = ["checkpoint-*", "*.previous-*", ".env", "*.env", "wandb/*", "runs/*", "merged/*", ".*.partial/*",
          ".*.replaced/*", "pytorch_model_fsdp_*", "optimizer_*", "global_step*/*",
          *(f"{where}{name}" for name in (*TRAINER_STATE, *RUN_RECORDS) for where in ("", "*/"))]
# Model files a push replaces: an earlier push of the other kind (an adapter, then the merged model) left its files
# in the repo, which then loaded as base + the old adapter.
REPLACED = ["*.safetensors", "*.bin", "*.gguf", "adapter_config.json", "config.json", "lota_config.json",
            "lota_mask*"]


def require_token() -> str:
    """A token to push with, and a Hub to push to: checked in seconds before the work whose result is pushed (a
    token alone let a run train, merge and check for hours, then fail in a traceback from create_repo)."""
    from huggingface_hub import get_token

    from alignkit.core.sources import hub_offline, push_unreachable

    token = get_token()  # HF_TOKEN, then the token file of a `huggingface-cli login`; never prompts
    if not token and not hub_offline():  # offline, a token would not help: that is said first
        raise UserError("pushing to the Hub needs a token: set HF_TOKEN in the environment or in .env")
    if why := push_unreachable():
        # Only what applies: with HF_HUB_OFFLINE not set, "HF_HUB_OFFLINE unset" sent one looking for it.
        needs = [*(["HF_HUB_OFFLINE unset"] if hub_offline() else []),
                 *([] if token else ["with a token: HF_TOKEN in the environment or in .env"])]
        raise HubUnreachable(f"pushing to the Hub needs the Hub, and {why}: run where it answers"
                             + (f" ({', '.join(needs)})" if needs else "")
                             + ", or leave out --push_to_hub and push the result once it does")
    return token


def check_pushable(folder) -> None:
    """Refuse an adapter whose recorded base is a local path (or a local adapter), or a checkpoint of a run on top
    of adapters (it names the bare base, and keeps those below in frozen_* folders no Hub loader reads): nobody
    else could load it as trained. And a folder that is not there, before the Hub is asked for a repo."""
    from alignkit.modeling.chain import adapter_chain, checkpoint_frozen

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not there: name a run folder, one of its checkpoint-N folders or a merged model")
    if below := checkpoint_frozen(str(folder)):
        raise UserError(f"{folder} is a checkpoint of a run on top of {len(below)} adapter(s) (its "
                        f"{', '.join(p.name for p in below)}): pushed as an adapter it would load without them, as a "
                        f"model nobody trained; push the merged model instead (merge.py --adapter_dir {folder} "
                        "--push_to_hub --hub_repo_id you/name)")
    base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path", "")
    if not base or is_hub_id(base):
        return
    local = Path(os.path.normpath(Path(folder, base)))
    merged = (f"push the merged model instead (merge.py --adapter_dir {folder} --push_to_hub --push merged "
              "--hub_repo_id you/name, or --merge_adaptors when training)")
    if not (local / "adapter_config.json").is_file():
        raise UserError(
            f"{folder} is an adapter on the local folder {base}, which nobody else can load from the Hub: {merged}, "
            f"or push that base first (huggingface-cli upload you/base {local}) and set base_model_name_or_path in "
            f"{folder / 'adapter_config.json'} to its repo id")
    # An adapter on a local adapter: the base below it is pushable only where the chain's root is on the Hub (the
    # advice to push the adapter below was refused in turn when that adapter too stood on a local base).
    root, parts = adapter_chain(str(folder))
    if not is_hub_id(root):
        raise UserError(f"{folder} is an adapter on the local adapter {base}, a chain over the local model {root}, "
                        f"which nobody else can load from the Hub: {merged}")
    below = [part for part in parts if not is_hub_id(part) and Path(part).resolve() != folder.resolve()]
    raise UserError(
        f"{folder} is an adapter on the local adapter {base}, which nobody else can load from the Hub: {merged}, or "
        f"push the adapters below it first, from the base up ({' then '.join(below)}; the first is on {root}): "
        f"merge.py --adapter_dir {below[0]} --push_to_hub --push adapter --hub_repo_id you/base, and set "
        "base_model_name_or_path in each adapter_config.json above it to the repo id of the one below it")


def _repo(repo_id: str | None, name: str) -> str:
    """--hub_repo_id, else `name` in the token's own namespace (TRL names the repo after its output_dir the same way)."""
    if repo_id:
        return repo_id
    logger.info(f"no --hub_repo_id: pushing to {name} in your account (pass --hub_repo_id you/name to choose)")
    return name


def push_dataset(jsonl_path, repo_id: str | None, private: bool = True) -> str:
    """Push a JSONL file (label.py's output) as a Hub dataset, private unless asked; returns its URL. No repo_id:
    the file's name (without .jsonl) in the token's namespace."""
    from datasets import Dataset
    from huggingface_hub import HfApi

    from alignkit.core.data import DataError

    path = Path(jsonl_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{path} has no rows to push: label some first (or drop --push_to_hub)")
    repo_id = _repo(repo_id, path.stem)
    if "/" not in repo_id:  # a bare name is created in the token's namespace: its full id is the Hub's answer
        repo_id = HfApi(token=require_token()).create_repo(repo_id, private=private, exist_ok=True,
                                                           repo_type="dataset").repo_id
    Dataset.from_list(rows).push_to_hub(repo_id, private=private, token=require_token())
    url = f"https://huggingface.co/datasets/{repo_id}"
    logger.info(f"pushed {len(rows)} rows to {url} ({'private' if private else 'public'})")
    return url


def push(folder, repo_id: str | None, private: bool = True, name: str | None = None) -> str:
    """Write the model card into `folder` and upload the folder (no checkpoints) to a model repo. No repo_id: `name`
    (default: the folder's) in the token's namespace."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if (folder / "lota_config.json").is_file():  # alignkit.modeling.lota_delta.CONFIG_FILE
        raise UserError(
            f"{folder} is a LoTA sparse delta, which only alignkit's loader applies: push the merged model "
            "(--merge_adaptors, or merge.py --push merged)"
        )
    check_pushable(folder)
    api = HfApi(token=require_token())
    from alignkit.core.card import model_card

    # A bare name (a recipe's `hub_model_id: zephyr-7b-dpo-full`) is created in the token's namespace: upload to the
    # repo id the Hub answers with, as transformers does, and name that one in the card.
    url = api.create_repo(_repo(repo_id, name or folder.resolve().name), private=private, exist_ok=True,
                          repo_type="model")
    repo_id = url.repo_id
    (folder / "README.md").write_text(model_card(folder, repo_id), encoding="utf-8")
    # A merge written into the folder (--output_dir runs/x/final): its own model, not part of this one.
    merges = [f"{p.name}/*" for p in folder.iterdir() if p.is_dir() and (p / "merge.json").is_file()]
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", ignore_patterns=IGNORE + merges,
                      delete_patterns=REPLACED, commit_message="Upload with alignkit")
    # create_repo leaves an existing repo's visibility as it was: say what it is, not what was asked
    private = getattr(api.repo_info(repo_id, repo_type="model"), "private", private)
    logger.info(f"pushed {folder} to {url} ({'private' if private else 'public'})")
    return str(url)
