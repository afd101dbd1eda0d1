"""Publishing to the Hugging Face Hub: a model card, the upload, and never a prompt or a secret.

The token comes from HF_TOKEN (or `.env`, or a cached `huggingface-cli login`); a missing token is an error
raised before any training or merging starts, never an interactive prompt. Repos are private unless asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import logger
from .args import redact

# Never uploaded: intermediate state, and anything that could hold credentials.
IGNORE = ["checkpoint-*", "*.previous-*", ".env", "*.env", "wandb/*", "runs/*", "merged/*"]


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN, then the token file of a `huggingface-cli login`; never prompts
    if not token:
        raise ValueError("pushing to the Hub needs a token: set HF_TOKEN in the environment or in .env")
    return token


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_card(folder, repo_id: str) -> str:
    """README.md for a merged model or an adapter folder, from the files the run left there."""
    folder = Path(folder)
    settings = _read_json(folder / "alignkit_config.json")  # already redacted when saved
    metrics = _read_json(folder / "metrics.json")
    merge = _read_json(folder / "merge.json")
    adapter = _read_json(folder / "adapter_config.json")
    evaluation = {p.name: _read_json(p) for p in sorted(folder.glob("eval*.json"))}
    is_adapter = bool(adapter) and not merge
    base = merge.get("base_model") or adapter.get("base_model_name_or_path") or settings.get("model_id", "")
    dataset = settings.get("dataset_id", "")
    stage = "DPO" if "dpo_beta" in settings else "SFT" if settings else "merged adapters"
    header = ["---", f"base_model: {base}" if base and not Path(base).exists() else None,
              f"datasets:\n- {dataset}" if dataset.count("/") == 1 and not Path(dataset).exists() else None,
              f"library_name: {'peft' if is_adapter else 'transformers'}",
              "tags:\n- alignkit\n- trl\n- lora\n- " + stage.split()[0].lower(), "---"]
    lines = [line for line in header if line]
    lines += ["", f"# {repo_id.split('/')[-1]}", "",
              f"{stage} of `{base}` with LoRA adapters, trained with alignkit on Hugging Face TRL."]
    if merge:
        lines += ["", f"Adapters merged into the base: {' -> '.join(f'`{a}`' for a in merge.get('adapters', []))}"
                      f"{' (into the dequantized NF4 base)' if merge.get('dequantize') else ''}; merged logits "
                      f"match base + adapters within {merge.get('max_logit_difference', 0):.1e}."]
    if settings:
        lines += ["", "## Training settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in settings.items() if v not in (None, "", [], False)]
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    for name, results in evaluation.items():
        lines += ["", f"## Evaluation ({name})", "", "```json", json.dumps(results, indent=2)[:4000], "```"]
    lines += ["", "## How to load it", "", "```python"]
    if is_adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    lines += ['messages = [{"role": "user", "content": "Hello!"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=128)[0]))", "```", ""]
    return redact("\n".join(lines))


def push(folder, repo_id: str, private: bool = True) -> str:
    """Write the model card into `folder` and upload the folder (no checkpoints) to a model repo."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if (folder / "lota_config.json").is_file():  # alignkit.lota.CONFIG_FILE
        raise ValueError(
            f"{folder} is a LoTA sparse delta, which only alignkit's loader applies: push the merged model "
            "(--merge_adaptors, or merge.py --push merged)"
        )
    base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path", "")
    if base and Path(base).exists():
        raise ValueError(
            f"{folder} is an adapter on the local model {base}, which nobody else can load: push the merged model "
            "(--merge_adaptors, or merge.py --push merged), or push that base first and point the adapter at it"
        )
    api = HfApi(token=require_token())
    (folder / "README.md").write_text(model_card(folder, repo_id))
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", ignore_patterns=IGNORE,
                      commit_message="Upload with alignkit")
    logger.info(f"pushed {folder} to {url} ({'private' if private else 'public'})")
    return str(url)
