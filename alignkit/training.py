"""What sft.py and dpo.py share around the trainer: the run folder, resuming, TRL's config, logging, the end.

A run lives in `output_dir/run_name`: `alignkit_config.json` (the resolved settings, no secrets), TRL's
`checkpoint-N` folders, and at the end the adapter, the tokenizer and `metrics.json`. `--resume auto`
continues from the last checkpoint only when the saved settings match the new ones, so a different run never
picks up another run's state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from . import logger, quiet_library_noise
from .args import config_to_dict, save_config

CONFIG_FILE = "alignkit_config.json"
# Settings that do not change what is trained: a run that differs only in these still resumes.
_NOT_TRAINING = {
    "resume", "merge_adaptors", "push_to_hub", "hub_repo_id", "hub_public", "report_to", "wandb_project",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "per_device_eval_batch_size", "output_dir",
}


def _slug(text: str) -> str:
    name = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".jsonl").removesuffix(".json"))[:40]


def run_dir(s, stage: str) -> Path:
    name = s.run_name or f"{stage}-{_slug(s.model_id)}-{_slug(s.dataset_id)}"
    return Path(s.output_dir) / name


def _complete(checkpoint: Path) -> bool:
    """transformers writes trainer_state.json last: a checkpoint cut off by a crash has none, or a torn one."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _training_view(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _NOT_TRAINING}


def world_size() -> int:
    """Processes launched together (accelerate launch / torchrun set WORLD_SIZE); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare_run(s, stage: str) -> tuple[Path, str | None]:
    """Create the run folder and decide where training starts: (folder, checkpoint to resume from or None).

    Under a multi-process launch the main process decides and writes first; the others then read the same
    folder and reach the same decision, without touching it.
    """
    quiet_library_noise()
    if world_size() == 1:
        return _prepare(s, stage, write=True)
    from accelerate import PartialState

    # On a machine without CUDA, processes talk over gloo; transformers needs use_cpu for that (trl_config).
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():
        return _prepare(s, stage, write=state.is_main_process)


def _prepare(s, stage: str, write: bool) -> tuple[Path, str | None]:
    folder = run_dir(s, stage)
    checkpoints = _checkpoints(folder) if folder.is_dir() else []
    saved_file = folder / CONFIG_FILE
    resume_from = None
    if s.resume == "true":
        if not checkpoints:
            raise ValueError(f"--resume true, but {folder} holds no checkpoint-N folder to resume from")
        resume_from = str(checkpoints[-1])
    elif s.resume == "auto" and checkpoints:
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
        old, new = _training_view(saved), _training_view(config_to_dict(s))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if not changed:
            resume_from = str(checkpoints[-1])
        elif write:
            aside = folder.with_name(f"{folder.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
            logger.info(f"{folder} was trained with other settings ({', '.join(changed)}): moved it to {aside}")
            shutil.move(str(folder), aside)
    elif s.resume == "false" and checkpoints and write:
        for checkpoint in checkpoints:  # a fresh start must not leave old checkpoints for a later resume
            shutil.rmtree(checkpoint)
    if resume_from and write:
        logger.info(f"resuming from {resume_from}")
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        save_config(s, folder / CONFIG_FILE)
    return folder, resume_from


def resolve_report_to(s) -> str:
    """wandb when asked for (or when a key is there), never with a login prompt that nobody can answer."""
    choice = s.report_to
    if choice == "auto":
        choice = "wandb" if (os.environ.get("WANDB_API_KEY") or s.wandb_project) else "none"
    if choice == "wandb":
        if s.wandb_project:
            os.environ["WANDB_PROJECT"] = s.wandb_project
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        netrc = Path.home() / ".netrc"
        logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text()
        if not (offline or os.environ.get("WANDB_API_KEY") or logged_in):
            raise ValueError(
                "wandb logging is on, but WANDB_API_KEY is not set (env or .env) and there is no wandb login. "
                "Set WANDB_API_KEY, or WANDB_MODE=offline to log locally, or --report_to none."
            )
        os.environ.setdefault("WANDB_LOG_MODEL", "false")  # never upload checkpoints (or what they hold) to wandb
    return choice


def trl_config(config_cls, s, folder: Path, dtype: torch.dtype, **stage_kwargs):
    """TRL's SFTConfig/DPOConfig from alignkit's settings; --trainer_overrides JSON adds anything else."""
    has_eval = s.eval_split > 0
    kwargs = dict(
        output_dir=str(folder), run_name=folder.name, seed=s.seed, data_seed=s.seed,
        num_train_epochs=s.num_train_epochs, max_steps=s.max_steps, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.per_device_train_batch_size,
        per_device_eval_batch_size=s.per_device_eval_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, max_length=s.max_length,
        warmup_steps=s.warmup_ratio, lr_scheduler_type=s.lr_scheduler_type, weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm, gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=s.logging_steps, save_strategy="steps", save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        eval_strategy="steps" if (has_eval and s.eval_steps) else "no", eval_steps=s.eval_steps,
        report_to=resolve_report_to(s), bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        prediction_loss_only=True,  # no logits are kept at eval: the metrics come from the loss pass
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only helps host-to-GPU copies
        disable_tqdm=not sys.stderr.isatty(),  # progress bars in a CI log are thousands of lines of noise
        push_to_hub=False,  # alignkit.hub pushes at the end, with a model card and without secrets
        # Several processes without CUDA: transformers only sets up gloo DDP between them with use_cpu.
        use_cpu=world_size() > 1 and not torch.cuda.is_available(),
        **stage_kwargs,
    )
    if "max_length" not in {f.name for f in dataclasses.fields(config_cls)}:
        kwargs.pop("max_length")  # GRPOConfig/RLOOConfig bound prompt and completion lengths separately
    if s.trainer_overrides:
        try:
            extra = json.loads(s.trainer_overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"--trainer_overrides is not valid JSON: {e}") from e
        kwargs.update(extra)
    return config_cls(**kwargs)


def split(dataset, s):
    """(train, eval or None): a seeded shuffle, --max_samples, then the held-out share."""
    dataset = dataset.shuffle(seed=s.seed)
    if s.max_samples:
        dataset = dataset.select(range(min(s.max_samples, len(dataset))))
    if s.eval_split <= 0:
        return dataset, None
    size = s.eval_split if s.eval_split < 1 else int(s.eval_split)
    if (size if size >= 1 else round(size * len(dataset))) < 1 or len(dataset) < 2:
        raise ValueError(f"eval_split {s.eval_split} leaves no held-out rows out of {len(dataset)}; raise it or pass 0")
    parts = dataset.train_test_split(test_size=size, seed=s.seed, shuffle=False)
    return parts["train"], parts["test"]


def finish(trainer, loaded, s, folder: Path, stage: str) -> dict:
    """Save the adapter and tokenizer, evaluate on the held-out rows, then merge and push if asked."""
    from .models import save_adapter

    if trainer.accelerator.is_main_process:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), loaded.tokenizer, folder, s.model_id)
    metrics = {k: v for k, v in trainer.state.log_history[-1].items()} if trainer.state.log_history else {}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    metrics["global_step"] = trainer.state.global_step
    metrics["num_processes"] = trainer.accelerator.num_processes
    if trainer.accelerator.is_main_process:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"{stage} adapter saved to {folder}")
    if trainer.accelerator.is_main_process and (s.merge_adaptors or s.push_to_hub):
        publish_run(folder, s)
    return metrics


def publish_run(folder: Path, s) -> None:
    """--merge_adaptors and --push_to_hub of sft.py and dpo.py, through alignkit.merge and alignkit.hub."""
    from .hub import push
    from .merge import merge_adapters

    target = folder
    if s.merge_adaptors:
        target = merge_adapters(str(folder), folder / "merged", dtype=s.dtype, trust_remote_code=s.trust_remote_code)
        logger.info(f"merged model saved to {target}")
    if s.push_to_hub:
        push(target, s.hub_repo_id, private=not s.hub_public)
