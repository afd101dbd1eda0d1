"""What sft.py and dpo.py share around the trainer: checks before any work, the run folder, resuming, TRL's
config, logging, the end.

A run lives in `output_dir/run_name`: `alignkit_config.json` (the resolved settings, no secrets), TRL's
`checkpoint-N` folders, and at the end the adapter, the tokenizer and `metrics.json`. `--resume auto`
continues from the last checkpoint only when the saved settings match the new ones, so a different run never
picks up another run's state.

No good run is thrown away: `prepare_run` only decides, and `start_run` claims the folder when training starts,
after the settings, the data, the model and the trainer have all been checked. An earlier run in the folder is
moved aside then (`NAME.previous-TIME`); if the new run fails before its first checkpoint, its folder is removed
and the earlier run goes back in place. A run that fails later keeps its checkpoints, marked by
`alignkit_failed.txt`, for `--resume auto` to continue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core import progress
from alignkit.core.args import ConfigError, config_to_dict, redact
from alignkit.core.errors import UserError
from alignkit.core.extras import require_tracker
from alignkit.core.journal import free_name, write_atomic
from alignkit.core.launch import agreed_minimum, every_process, free_memory, training_device, world_size
from alignkit.core.mixture import split  # noqa: F401  (the held-out share; scripts import it from here)

CONFIG_FILE = "alignkit_config.json"
FAILED_FILE = "alignkit_failed.txt"  # in a run folder whose training raised after its first checkpoint
# In a claimed run folder until training finishes: where the earlier run went, for when this one is killed before
# its first checkpoint (no `except` runs then) and the next command must put the earlier run back.
CLAIM_FILE = "alignkit_claim.json"
# Settings that do not change what is trained: a run that differs only in these still resumes.
NOT_TRAINING = {
    "resume", "merge_adaptors", "push_to_hub", "hub_repo_id", "hub_public", "report_to", "wandb_project",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "per_device_eval_batch_size", "output_dir",
    "run_type",  # recorded beside the settings (save_run_config); the run folder's name already holds the stage
    "prefix_sharing",  # the same log-probs either way (alignkit.train.prefix), only faster
    "inputs",  # recorded beside the settings (save_run_config) and compared by content (_changed)
}
# A stage's settings that are TRL config fields (alignkit name -> TRL name): passed wherever both the settings and
# the TRL config class have them, as the shared fields are, so no script maps them by hand.
STAGE_FIELDS = {
    "dpo_beta": "beta", "loss_type": "loss_type", "loss_weights": "loss_weights", "label_smoothing": "label_smoothing",
    "precompute_ref_log_probs": "precompute_ref_log_probs",  # DPOConfig
    "packing": "packing",  # SFTConfig
    "center_rewards_coefficient": "center_rewards_coefficient",  # RewardConfig
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
    return {k: v for k, v in settings.items() if k not in NOT_TRAINING}


def preflight(s) -> None:
    """What can fail before any work, checked in seconds: a push's token and base, wandb's key, the Hub."""
    from alignkit.core.hub import require_reachable, require_token
    from alignkit.core.sources import is_hub_id

    if s.push_to_hub:
        require_token()  # now, not after hours of training
        if not s.merge_adaptors and not is_hub_id(s.model_id):
            raise ConfigError(
                f"--push_to_hub pushes the adapter alone, and its base {s.model_id} is local: nobody else could "
                "load it. Add --merge_adaptors to push the merged model, or train on a base from the Hub."
            )
    resolve_report_to(s)
    check_trl_values(s)
    require_reachable(s.model_id, s.dataset_id)


def check_trl_values(s) -> None:
    """--lr_scheduler_type and every --trainer_overrides entry as TRL's config takes them (an enum's values, a
    field's type), now: TRL itself would refuse them when its config is built, after the data and model loaded."""
    from alignkit.core.trl_names import trl_fields, trl_value

    names = tuple(getattr(s, "trl_configs", ("SFTConfig",)))
    types = trl_fields(names)
    overrides = s.trainer_overrides if isinstance(s.trainer_overrides, dict) else {}
    for name, value in {"lr_scheduler_type": s.lr_scheduler_type, **overrides}.items():
        if name in types:  # a name TRL's config lacks is trl_config's one line, with the same data
            flag = f"--{name}" if name == "lr_scheduler_type" else f"--trainer_overrides {name}"
            trl_value(value, types[name], flag)


def prepare_run(s, stage: str) -> tuple[Path, str | None]:
    """Where this run goes and where training starts: (folder, checkpoint to resume from or None).

    Writes nothing: `start_run` claims the folder once the new run is sure to start. Under a multi-process launch
    every rank decides from its own view of the folder, then they compare: a folder that is not shared by every
    machine (one rank would resume, another start over, and the first collective would wait forever) stops all of
    them at once with one line.
    """
    progress.quiet_library_noise()
    folder = run_dir(s, stage)
    if int(os.environ.get("RANK", 0)) == 0:
        _restore_stranded(folder)
    every_process(None)  # the others look once the main process has put an earlier run back
    checkpoints = _checkpoints(folder) if folder.is_dir() else []
    resume = s.resume == "true" or (s.resume == "auto" and checkpoints and not _changed(folder, s))
    checkpoint = checkpoints[-1].name if resume and checkpoints else None
    views = every_process(checkpoint)
    if differing := [rank for rank, other in enumerate(views) if other != views[0]]:
        said = [f"{view} to resume from" if view else "no checkpoint to resume from" for view in views]
        rank = differing[0]
        raise UserError(f"{folder} is not the same folder for every process of this launch: rank 0 sees {said[0]}, "
                        f"rank {rank} sees {said[rank]}. Give --output_dir a folder every machine shares.")
    if s.resume == "true" and not checkpoint:
        raise ConfigError(f"--resume true, but {folder} holds no checkpoint-N folder to resume from")
    return folder, str(folder / checkpoint) if checkpoint else None


def _changed(folder: Path, s) -> list[str]:
    """The training settings in which `s` differs from the run saved in `folder`, and the inputs they name by path
    whose content differs (the model's chain and local data retrained or edited in place)."""
    saved_file = folder / CONFIG_FILE
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    old, new = _training_view(saved), _training_view(config_to_dict(s))
    changed = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
    # One folder or file spelled two ways (runs/sft, ./runs/sft/, its absolute path) is the same input: its content
    # is compared below, under the spelling the run recorded (the data digest is keyed by it).
    respelled = {k: old[k] for k in changed if _same_place(old.get(k), new.get(k))}
    changed = [k for k in changed if k not in respelled]
    if "inputs" in saved:  # a run saved before alignkit recorded them compares by settings alone
        now = run_inputs(dataclasses.replace(s, **respelled) if respelled else s)
        changed += [k for k in now if saved["inputs"].get(k) != now[k]]
    return sorted(changed)


def _same_place(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists() and \
        Path(a).resolve() == Path(b).resolve()


def run_inputs(s) -> dict:
    """What the settings name by path, by content: the model's whole chain (alignkit.modeling.identity) and each
    local data file or folder. A Hub model counts by its commit; a Hub dataset by its id and split (settings)."""
    from alignkit.core.digests import digest
    from alignkit.modeling.identity import chain_identity, data_identity

    sources = [s.dataset_id, *(entry["id"] for entry in (s.dataset_mixture or {}).get("datasets", []))]
    data = {source: found for source in sources if (found := data_identity(source)) is not None}
    model = chain_identity(s.model_id, getattr(s, "revision", None), getattr(s, "gguf_file", None))
    return {"model files": digest(model), "data files": digest(data)}


def _holds_work(folder: Path) -> bool:
    """A checkpoint, an adapter, metrics or a merged model: something a run took time to make."""
    return folder.is_dir() and any(
        any(folder.glob(pattern)) for pattern in ("checkpoint-*", "adapter_model.*", "metrics.json", "merged")
    )


@contextlib.contextmanager
def start_run(s, folder: Path, resume_from: str | None):
    """Claim the run folder for the training inside the `with` block (see the module docstring).

    Under a multi-process launch the main process moves and writes; the others wait for it, then train.
    """
    if world_size() == 1:
        write, order = True, contextlib.nullcontext()
    else:
        from accelerate import PartialState

        # On a machine without CUDA, processes talk over gloo; transformers needs use_cpu for that (trl_config).
        state = PartialState(cpu=not torch.cuda.is_available())
        write, order = state.is_main_process, state.main_process_first()
    aside = None
    with order:
        if write:
            aside = _claim(s, folder, resume_from)
    try:
        yield
    except BaseException as error:  # Ctrl-C too: a run stopped before its first checkpoint gives the folder back
        if write:
            _release(folder, aside, error)
        raise


def _claim(s, folder: Path, resume_from: str | None) -> Path | None:
    aside = None
    if resume_from:
        logger.info(f"resuming from {resume_from}")
    elif _holds_work(folder):
        aside = free_name(folder.parent, f"{folder.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        changed = _changed(folder, s)
        why = f"trained with other settings ({', '.join(changed)})" if changed else f"--resume {s.resume}"
        logger.info(f"{folder} holds an earlier run ({why}): moved it to {aside}")
    try:  # a Ctrl-C anywhere in here gives the folder back too (start_run's `except` only covers training)
        if aside:
            shutil.move(str(folder), aside)
        folder.mkdir(parents=True, exist_ok=True)
        if aside:
            write_atomic(folder / CLAIM_FILE, json.dumps({"earlier_run": str(aside)}) + "\n")
        (folder / FAILED_FILE).unlink(missing_ok=True)
        save_run_config(s, folder / CONFIG_FILE)
    except BaseException as error:
        if aside and Path(aside).exists():
            _release(folder, aside, error)
        raise
    return aside


def _restore_stranded(folder: Path) -> None:
    """A run killed before its first checkpoint (SIGKILL, the host's OOM killer: no `except` ran) left its folder
    claimed and empty, and the earlier run aside: put the earlier run back before anything looks at the folder."""
    claim = folder / CLAIM_FILE
    if not claim.is_file() or _holds_work(folder):
        return
    try:
        earlier = Path(json.loads(claim.read_text())["earlier_run"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if earlier.is_dir():
        shutil.rmtree(folder)
        shutil.move(str(earlier), folder)
        logger.info(f"the run in {folder} stopped before its first checkpoint: the earlier run is back in place "
                    f"(from {earlier})")


def save_run_config(s, path: Path) -> None:
    """alignkit_config.json: the resolved settings (secrets redacted), the run type (`run_type` of the settings
    class: sft, dpo, reward, rl), so a model card states what the run was instead of guessing it, and the content
    of what the settings name by path (`run_inputs`), which `--resume auto` compares."""
    data = {**config_to_dict(s), "run_type": getattr(s, "run_type", None), "inputs": run_inputs(s)}
    write_atomic(path, json.dumps(data, indent=2) + "\n")  # a torn file would stop the next --resume auto


def _release(folder: Path, aside: Path | None, error: BaseException) -> None:
    """After a failed run: keep what it saved, or give the folder back to the run that was there."""
    if _checkpoints(folder):
        (folder / FAILED_FILE).write_text(redact(f"{type(error).__name__}: {error}\n"))
        logger.info(f"the run failed; its checkpoints stay in {folder} (see {FAILED_FILE}): the same command resumes"
                    + (f"; the earlier run is in {aside}" if aside else ""))
        return
    shutil.rmtree(folder, ignore_errors=True)
    if aside:
        shutil.move(str(aside), folder)
        logger.info(f"the run failed before its first checkpoint: removed it; the earlier run is back in {folder}")
    else:
        logger.info(f"the run failed before its first checkpoint: removed {folder}")


def resolve_report_to(s) -> str | list[str]:
    """wandb when asked for (or when a key is there), never with a login prompt that nobody can answer;
    tensorboard only when it is installed. One tracker as its name, several as TRL's list."""
    asked = [s.report_to] if isinstance(s.report_to, str) else list(s.report_to)
    asked = [c for c in asked if c != "none"] or ["none"]
    if "auto" in asked:
        auto = "wandb" if (os.environ.get("WANDB_API_KEY") or s.wandb_project) else "none"
        asked = [c for c in asked if c != "auto"] + ([auto] if auto != "none" or len(asked) == 1 else [])
    for tracker in asked:
        require_tracker(tracker)  # the tracking extra (wandb, tensorboard): installed, or one line saying how
    if "wandb" in asked:
        if s.wandb_project:
            os.environ["WANDB_PROJECT"] = s.wandb_project
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        netrc = Path.home() / ".netrc"
        logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text()
        if not (offline or os.environ.get("WANDB_API_KEY") or logged_in):
            raise UserError(
                "wandb logging is on, but WANDB_API_KEY is not set (env or .env) and there is no wandb login. "
                "Set WANDB_API_KEY, or WANDB_MODE=offline to log locally, or --report_to none."
            )
        os.environ.setdefault("WANDB_LOG_MODEL", "false")  # never upload checkpoints (or what they hold) to wandb
    return asked[0] if len(asked) == 1 else asked


ACTIVATION_SHARE = 0.5  # gradient checkpointing stays off while a micro-batch's activations fit in this share


def activation_bytes(model, s, dtype: torch.dtype) -> int:
    """What one micro-batch's activations take without gradient checkpointing, at its worst (every row at
    max_length): per token and layer a Llama-style block keeps about 8 hidden-sized and 4 intermediate-sized
    tensors for the backward (norm inputs, q/k/v, attention output; the MLP's input, gate, up, activation), and
    the LM head's fp32 logits and log-softmax take 2 x 4 bytes per vocabulary entry. Preference pairs are two rows.
    DPO's prefix sharing packs a pair into one row of up to 2 x max_length tokens whose 4D attention mask
    (alignkit.train.prefix) takes about (2 x max_length)^2 bytes as a bool, plus a float copy inside attention:
    counted too, though it stays near 1% of the rest (batch 4 at 8k tokens: 3 GiB of about 300).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    length = getattr(s, "max_length", None) or (getattr(s, "max_prompt_length", None) or 512) + getattr(
        s, "max_completion_length", 256)
    rows = s.per_device_train_batch_size * (2 if getattr(s, "run_type", "") in ("dpo", "reward") else 1)
    tokens = rows * length
    per_token = config.num_hidden_layers * (8 * hidden + 4 * inner) * dtype.itemsize + 8 * config.vocab_size
    masks = 0
    if getattr(s, "run_type", "") == "dpo" and getattr(s, "prefix_sharing", False):
        masks = s.per_device_train_batch_size * (2 * length) ** 2 * (1 + dtype.itemsize)
    return tokens * per_token + masks


def resolve_gradient_checkpointing(s, model, dtype: torch.dtype) -> bool:
    """--gradient_checkpointing: true/false as given; auto: off when a micro-batch's activations (estimated by
    `activation_bytes`) fit in half the memory free on the device this process trains on, since recomputing them
    costs about a fifth of a step; on otherwise, or with no model to size them. A 7B QLoRA run on a 24 GB GPU
    (batch 4, 1024 tokens) needs about 40 GB of them: on. The tiny preset on a CPU: off. The choice is logged.

    The device is this process's GPU (alignkit.core.launch.training_device), not the model's first parameter: under
    FSDP, or a sharded 4-bit load, that sits on the CPU or the meta device and would measure host RAM. Under a
    multi-process launch the smallest free memory of all ranks decides, so every rank takes the same choice.
    """
    requested = str(s.gradient_checkpointing).strip().lower()
    if requested in ("true", "false"):
        return requested == "true"
    if model is None:
        return True
    needed = activation_bytes(model, s, dtype)
    device = training_device()
    free = agreed_minimum(free_memory(device))
    on = needed > ACTIVATION_SHARE * free
    ranks = " (the least of all ranks)" if world_size() > 1 else ""
    logger.info(f"gradient checkpointing: {'on' if on else 'off'} (auto: a micro-batch's activations take up to "
                f"{needed / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free on {device.type}{ranks}, "
                f"{'more' if on else 'less'} than half; --gradient_checkpointing true|false to choose)")
    return on


def trl_config(config_cls, s, folder: Path, dtype: torch.dtype, model=None, **stage_kwargs):
    """TRL's SFTConfig/DPOConfig from alignkit's settings; --trainer_overrides (every TRL field given under its
    TRL name, alignkit.core.trl_names) goes on top. `model` (the loaded model) sizes --gradient_checkpointing
    auto; without it, checkpointing stays on."""
    has_eval = s.has_eval_data() if hasattr(s, "has_eval_data") else s.eval_split > 0
    kwargs = dict(
        output_dir=str(folder), run_name=folder.name, seed=s.seed, data_seed=s.seed,
        num_train_epochs=s.num_train_epochs, max_steps=s.max_steps, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.per_device_train_batch_size,
        per_device_eval_batch_size=s.per_device_eval_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, max_length=s.max_length,
        warmup_steps=s.warmup_ratio, lr_scheduler_type=s.lr_scheduler_type, weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm, gradient_checkpointing=resolve_gradient_checkpointing(s, model, dtype),
        logging_steps=s.logging_steps, save_strategy="steps", save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        eval_strategy="steps" if (has_eval and s.eval_steps) else "no", eval_steps=s.eval_steps,
        report_to=resolve_report_to(s), bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        prediction_loss_only=True,  # no logits are kept at eval: the metrics come from the loss pass
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only helps host-to-GPU copies
        disable_tqdm=not progress.live(),  # a bar in a terminal and a notebook; none in CI logs
        push_to_hub=False,  # alignkit.core.hub pushes at the end, with a model card and without secrets
        # Without CUDA the CPU trains: alignkit loaded the model there and decided its dtype, attention, threads and
        # memory for it, while transformers would move it to Apple's MPS or Intel's XPU where torch finds one
        # (alignkit.core.launch.other_accelerator). Several processes also only get gloo DDP with use_cpu, and bf16
        # on a CPU (a recipe's bf16: true) needs it ("Your setup doesn't support bf16/gpu").
        use_cpu=not torch.cuda.is_available(),
        **stage_kwargs,
    )
    if world_size() > 1:
        # Left unset, transformers turns it on for any model that is not a PreTrainedModel, a PeftModel included
        # (transformers/trainer.py, accelerator setup: `else: find_unused = True`), and DDP then walks the whole
        # autograd graph after every backward looking for unused parameters (with reentrant gradient checkpointing
        # it even fails). Every LoRA parameter is used in every step.
        kwargs["ddp_find_unused_parameters"] = False
    if getattr(s, "group_by_length", False):  # SFT and DPO; the trainers build the sampler (alignkit.train.trainers)
        kwargs["train_sampling_strategy"] = "group_by_length"
    # A config class that is no dataclass (a test's stand-in) takes the shared fields as they are.
    trl_fields = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set(kwargs)
    for name, trl_name in STAGE_FIELDS.items():
        if hasattr(s, name) and trl_name in trl_fields and trl_name not in stage_kwargs:
            kwargs[trl_name] = getattr(s, name)
    if "max_length" not in trl_fields:
        kwargs.pop("max_length")  # GRPOConfig/RLOOConfig bound prompt and completion lengths separately
    extra = s.trainer_overrides or {}
    if isinstance(extra, str):  # a settings object built in code, not parsed
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--trainer_overrides is not valid JSON: {e}; pass a JSON object, e.g. "
                              "'{\"optim\": \"paged_adamw_8bit\"}'") from e
    foreign = sorted(set(extra) - trl_fields) if dataclasses.is_dataclass(config_cls) else []
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: not field(s) of TRL's {config_cls.__name__}, which this run uses; "
                          "drop them")
    if extra.get("eval_strategy") not in (None, "no") and not has_eval:
        raise ConfigError(f"eval_strategy {extra['eval_strategy']} but no held-out data: pass --eval_split 0.05 or "
                          "--dataset_test_split test, or eval_strategy no")
    kwargs.update(extra)
    try:
        args = config_cls(**kwargs)
    except (ValueError, TypeError) as e:  # what TRL or transformers checks across fields, in their words
        text = " ".join(str(e).split())
        raise ConfigError(f"TRL's {config_cls.__name__} refuses these settings: {text}") from None
    one_gpu_per_process(args, config_cls)
    return args


def launch_command(script: str, gpus: int) -> str:
    """The exact `accelerate launch` line that runs this command on `gpus` GPUs (one process each, DDP)."""
    import shlex

    flags = sys.argv[1:] if Path(sys.argv[0]).name == script else []
    return shlex.join(["accelerate", "launch", "--config_file", "recipes/accelerate/ddp.yaml", "--num_processes",
                       str(gpus), script, *flags])


def one_gpu_per_process(args, config_cls=None) -> None:
    """A plain `python dpo.py` that sees several GPUs trains on one, and says how to use them all.

    With no distributed launcher, transformers gives the process every visible GPU (training_args.py
    `_setup_devices`: `self._n_gpu = torch.cuda.device_count()`) so that the Trainer wraps the model in
    nn.DataParallel, which TRL refuses (trl/trainer/dpo_trainer.py: "does not support `nn.DataParallel`"), and
    which would split a 4-bit model placed on one GPU anyway. One GPU, and the launch line for all of them.
    """
    gpus = args.n_gpu
    if world_size() > 1 or gpus <= 1:
        return
    args._n_gpu = 1  # what Trainer itself sets for a model it must not replicate (trainer.py: is_model_parallel)
    script = Path(sys.argv[0]).name if sys.argv[0].endswith(".py") and Path(sys.argv[0]).is_file() else (
        "sft.py" if config_cls is not None and "SFT" in config_cls.__name__ else "dpo.py")
    logger.warning(f"{gpus} GPUs are visible and this is one process: training on GPU {torch.cuda.current_device()} "
                   f"only. To train on all {gpus}: {launch_command(script, gpus)}")


def finish(trainer, loaded, s, folder: Path, stage: str, measured: dict | None = None) -> dict:
    """Save the adapter and tokenizer, evaluate on the held-out rows, then merge and push if asked. `measured`:
    figures the script took itself (reward.py's held-out report), in metrics.json, the card and the summary."""
    from alignkit.modeling.gguf import source_id
    from alignkit.modeling.models import save_adapter

    base = source_id(s.model_id, getattr(s, "gguf_file", None))  # a GGUF in a folder or repo: recorded whole
    if trainer.accelerator.is_main_process:
        (folder / CLAIM_FILE).unlink(missing_ok=True)  # trained: the earlier run aside is history now
    # Every rank takes part in gathering the weights (a collective); only the main process writes them.
    state_dict = gathered_state_dict(trainer) if getattr(s, "adapter", "lora") != "lota" else None
    if trainer.accelerator.is_main_process and getattr(s, "adapter", "lora") == "lota":
        from alignkit.train.lota import save_run  # a sparse delta and its mask instead of a LoRA adapter

        save_run(trainer.accelerator.unwrap_model(trainer.model), loaded.tokenizer, folder, base, s)
    elif trainer.accelerator.is_main_process:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), loaded.tokenizer, folder, base,
                     state_dict=state_dict, revision=getattr(s, "revision", None))
    metrics = {k: v for k, v in trainer.state.log_history[-1].items()} if trainer.state.log_history else {}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    metrics["global_step"] = trainer.state.global_step
    metrics["num_processes"] = trainer.accelerator.num_processes
    metrics.update(measured or {})
    if trainer.accelerator.is_main_process:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"{stage} adapter saved to {folder}")
    merged = hub_url = None
    if trainer.accelerator.is_main_process and (s.merge_adaptors or s.push_to_hub):
        merged, hub_url = publish_run(folder, s)
    if trainer.accelerator.is_main_process:  # training.png and the closing summary (alignkit.train.report)
        from alignkit.train.report import report

        report(trainer, stage, folder, metrics, merged=merged, hub_url=hub_url)
    return metrics


def gathered_state_dict(trainer) -> dict | None:
    """The full weights of a sharded model, gathered on every rank as Trainer.save_model does; None when unsharded.

    Under ZeRO-3 each rank holds a partition, and the unwrapped model's parameters are empty (torch.Size([0])):
    saving them writes an adapter that neither reloads nor merges. transformers gathers them first
    (trainer.py save_model: `self.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)`
    for a PeftModel), on every rank, since the gather is a collective. Under FSDP with SHARDED_STATE_DICT,
    save_model writes no weights at all (trainer.py: only FULL_STATE_DICT saves), and a state_dict() on the main
    process alone hangs: FSDP's state-dict hooks all-gather the flat parameters first
    (torch/distributed/fsdp/_state_dict_utils.py, _enter_unshard_params_ctx), a collective the other ranks never
    join. accelerate's get_state_dict gathers a full state dict (FULL_STATE_DICT, rank 0 only) on every rank.
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        engine = trainer.deepspeed
        if trainer.accelerator.deepspeed_config["zero_optimization"]["stage"] != 3:
            # ZeRO-0/1/2 partition optimizer states and gradients, never the weights: the model is whole on every
            # rank. accelerate's get_state_dict would clone all of it, frozen base included, into every rank's
            # host RAM (clone_tensors_for_torch_save) for an adapter of a few megabytes.
            return None
        # Only the trainable (adapter) weights, as save_model does for a PeftModel under ZeRO-3: gathering the
        # frozen base too would put the whole 16-bit model in the main process's RAM for nothing.
        try:
            return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        except TypeError:  # a DeepSpeed without the argument: the whole model, as accelerate gathers it
            return trainer.accelerator.get_state_dict(engine)
    if getattr(trainer, "is_fsdp_enabled", False):
        if getattr(trainer.accelerator, "is_fsdp2", False):
            return _fsdp2_trainable_state_dict(trainer.accelerator.unwrap_model(trainer.model))
        return trainer.accelerator.get_state_dict(trainer.model)
    return None


def _fsdp2_trainable_state_dict(model) -> dict:
    """The trainable weights of a model sharded by FSDP2 (`fully_shard`), whole, on every rank.

    FSDP2 shards in place: each parameter is a DTensor holding this rank's rows. accelerate's get_state_dict hands
    back those DTensors (peft's save then fails on their storage), and a full state dict would gather the frozen
    base too, into host RAM, for an adapter of a few megabytes. So, as under ZeRO-3: only what trains (the adapter,
    a reward model's score head), each gathered with `full_tensor()`, a collective every rank joins in the same
    parameter order."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


def publish_run(folder: Path, s) -> tuple[Path | None, str | None]:
    """--merge_adaptors and --push_to_hub of sft.py and dpo.py, through alignkit.modeling.merge and
    alignkit.core.hub: (the merged folder, the Hub URL), None for what was not asked."""
    from alignkit.core.hub import push
    from alignkit.modeling.merge import merge_adapters

    target, merged, url = folder, None, None
    if s.merge_adaptors:
        from alignkit.core.launch import outside_zero3

        with outside_zero3():  # the main process alone builds the whole model: not under ZeRO-3's zero.Init
            target = merged = merge_adapters(str(folder), folder / "merged", dtype=s.dtype,
                                             trust_remote_code=s.trust_remote_code)
        logger.info(f"merged model saved to {target}")
    if s.push_to_hub:
        url = push(target, s.hub_repo_id, private=not s.hub_public)
    return merged, url
