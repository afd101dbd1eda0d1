"""What the training scripts share around the trainer: checks before any work, TRL's config, logging, the end
(save, evaluate, merge, push). The run folder itself (resuming, claiming it without losing an earlier run) is
alignkit.train.run_folder; its entry points are importable from here, as the scripts import them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core import progress
from alignkit.core.args import ConfigError
from alignkit.core.secrets import redact
from alignkit.core.errors import STEP_AGAIN, UserError, run_again, sigterm_asked, stop_for_sigterm
from alignkit.core.extras import has_tracker, require_tracker, wandb_ready
from alignkit.core.journal import write_atomic
from alignkit.core.launch import agreed_minimum, free_memory, training_device, world_size
from alignkit.core.mixture import split  # noqa: F401  (the held-out share; scripts import it from here)
from alignkit.train import cell_checks
# The run folder (alignkit.train.run_folder): the scripts import these from here.
from alignkit.train.run_folder import (  # noqa: F401
    CLAIM_FILE, CONFIG_FILE, FAILED_FILE, NOT_TRAINING, check_trained, check_training_cell, prepare_run, run_dir,
    run_inputs, save_run_config, start_run,
)

# A stage's settings that are TRL config fields (alignkit name -> TRL name): passed wherever both the settings and
# the TRL config class have them, as the shared fields are, so no script maps them by hand.
STAGE_FIELDS = {
    "dpo_beta": "beta", "loss_type": "loss_type", "loss_weights": "loss_weights", "label_smoothing": "label_smoothing",
    "precompute_ref_log_probs": "precompute_ref_log_probs",  # DPOConfig
    "packing": "packing",  # SFTConfig
    "center_rewards_coefficient": "center_rewards_coefficient",  # RewardConfig
    "chat_template_kwargs": "chat_template_kwargs",  # GRPOConfig (rl.py; label.py and evaluate.py generate with it)
}


def preflight(s) -> None:
    """What can fail before any work, checked in seconds: a push's token and base, wandb's key, the Hub. In a
    notebook, settings that fail here leave the kernel as a failed parse does (alignkit.core.errors)."""
    from alignkit.core.hub import require_reachable, require_token
    from alignkit.core.paths import check_writable
    from alignkit.core.saved_settings import keep_not_applied  # for the run's config and card, as a recipe's keys
    from alignkit.core.sources import HubUnreachable, is_hub_id
    from alignkit.modeling.model_folders import check_model_source
    from alignkit.train.loss_mask import check_end_tokens

    if s.push_to_hub:
        if not s.merge_adaptors and not is_hub_id(s.model_id):
            raise ConfigError(
                f"--push_to_hub pushes the adapter alone, and its base {s.model_id} is local: nobody else could "
                "load it. Add --merge_adaptors to push the merged model, or train on a base from the Hub."
            )
        require_token()  # a token and a Hub that answers: now, not after hours of training
    if getattr(s, "revision", None) and not is_hub_id(s.model_id):  # a recipe's model_revision over a local copy
        logger.warning(f"--revision {s.revision} is not used: {s.model_id} is a local folder, read as it is")
        keep_not_applied(s, {"revision": {"value": s.revision, "why": "model_id is a local folder, read as it is"}})
    resolve_report_to(s)
    check_trl_values(s)
    check_writable(s.output_dir, "--output_dir")
    try:  # a local folder without weights, a run still training; a path not there (a notebook's folder), a Hub id
        check_model_source(s.model_id, cache=False, flag="--model_id")  # the Hub lacks: now, in one line
    except HubUnreachable:  # a Hub id, the Hub silent: the line below names every id this run fetches
        pass
    if Path(s.model_id).exists():
        check_stack(s)
    mixture = getattr(s, "dataset_mixture", None) or {}  # its own datasets: --dataset_id's default goes unread
    require_reachable(s.model_id, *([e["id"] for e in mixture["datasets"]] if mixture else [s.dataset_id]))
    check_end_tokens(s)  # TRL's eos_token/pad_token outside the vocabulary: its traceback once the model had loaded


def check_stack(s) -> None:
    """What a local model's chain (alignkit.modeling.chain) makes impossible, refused before it loads (found by a
    dpo.py audit: one stopped after the load with PEFT's traceback, one trained against another reference)."""
    from alignkit.modeling.chain import resolve

    chain = resolve(s.model_id, getattr(s, "revision", None))
    # DPO and KTO: TRL copies the adapter for its reference, and PEFT cannot take that copy off again where a module
    # is saved whole under several active adapters (sft.py trains the same stack).
    if getattr(s, "lora_modules_to_save", None) and chain.adapters and getattr(s, "adapter", "lora") == "lora" and \
            hasattr(s, "reference_adapters"):
        raise ConfigError(
            f"--lora_modules_to_save {' '.join(s.lora_modules_to_save)} over the adapter {s.model_id}: PEFT cannot "
            "train a module's own copy beside the frozen adapters under it here (it stopped after the load: "
            "\"Attempted to set multiple adapters at once for ModulesToSaveWrapper\"). Merge it first (python "
            f"merge.py --adapter_dir {s.model_id}) and train on the merged model, or drop --lora_modules_to_save")
    if getattr(s, "reference_adapters", None) == 0 and chain.deltas:
        raise ConfigError(
            f"--reference_adapters 0 asks for the bare base as the reference, but {s.model_id}'s chain holds the "
            f"LoTA delta {chain.deltas[-1]}, which is added into the weights as it loads: every reference keeps it. "
            "Drop --reference_adapters (the reference is the model you start from), or start from the bare base")


def check_trl_values(s) -> None:
    """--lr_scheduler_type and every --trainer_overrides entry as TRL's config takes them (an enum's values, a
    field's type), now: TRL itself would refuse them when its config is built, after the data and model loaded."""
    from alignkit.core.trl_types import trl_fields, trl_value

    names = tuple(getattr(s, "trl_configs", ("SFTConfig",)))
    types = trl_fields(names)
    overrides = s.trainer_overrides if isinstance(s.trainer_overrides, dict) else {}
    if len(names) > 1 and getattr(s, "algo", None):  # rl.py: the algorithm's config alone takes them
        name = {"grpo": "GRPOConfig", "rloo": "RLOOConfig"}[s.algo]
        if foreign := sorted(set(overrides) - set(trl_fields((name,)))):
            other = "" if set(foreign) - set(types) else ", or pick the other --algo"  # types: both configs'
            raise ConfigError(f"{', '.join(foreign)}: not field(s) of TRL's {name}, which --algo {s.algo} uses; drop "
                              f"them{other}")
    if foreign := sorted(set(overrides) - set(types)):  # refused by trl_config too, once the data and model loaded
        own = [n for n in foreign if n in {f.name for f in dataclasses.fields(s)}] if dataclasses.is_dataclass(s) else []
        flag = f" (--{own[0]} is alignkit's own setting: pass it as a flag)" if own else ""
        raise ConfigError(f"--trainer_overrides {', '.join(foreign)}: not field(s) of TRL's {' or '.join(names)}, "
                          f"which this run uses; drop them{flag}")
    for name, value in {"lr_scheduler_type": s.lr_scheduler_type, **overrides}.items():
        if name in types:  # a name TRL's config lacks is trl_config's one line, with the same data
            flag = f"--{name}" if name == "lr_scheduler_type" else f"--trainer_overrides {name}"
            trl_value(value, types[name], flag)
    kwargs = overrides.get("dataset_kwargs")
    if isinstance(kwargs, dict) and str(kwargs.get("skip_prepare_dataset")).lower() in ("true", "1"):
        # TRL then hands the rows to the model untokenized: "No columns in the dataset match", after the load
        raise ConfigError("--dataset_kwargs skip_prepare_dataset: alignkit reads and checks every row and TRL "
                          "tokenizes it; already tokenized rows are not taken: drop it")


def resolve_report_to(s, quiet: bool = False) -> str | list[str]:
    """wandb when asked for (or when a key is there), never with a login prompt that nobody can answer;
    tensorboard only when it is installed; `all` (transformers' word): every one of them installed, wandb where it
    can log without a prompt. One tracker as its name, several as TRL's list."""
    asked = [s.report_to] if isinstance(s.report_to, str) else list(s.report_to)
    asked = [c for c in asked if c != "none"] or ["none"]
    if "all" in asked:
        # wandb where it logs without a prompt, or where --wandb_project asks for it (then its key is checked below)
        off = os.environ.get("WANDB_MODE", "").lower() == "disabled"
        found = [t for t in ("wandb", "tensorboard") if has_tracker(t) and
                 (t != "wandb" or not off and (wandb_ready() or s.wandb_project))]
        if not quiet:  # said once, by the check before the model loads
            logger.info(f"--report_to all: {', '.join(found) or 'none'} (wandb and tensorboard, where installed; "
                        "wandb with WANDB_API_KEY, a login, --wandb_project or WANDB_MODE=offline)")
        asked = list(dict.fromkeys(c for c in asked + found if c != "all")) or ["none"]
    if "auto" in asked:
        auto = "wandb" if (os.environ.get("WANDB_API_KEY") or s.wandb_project) else "none"
        asked = [c for c in asked if c != "auto"] + ([auto] if auto != "none" or len(asked) == 1 else [])
    for tracker in asked:
        require_tracker(tracker)  # the tracking extra (wandb, tensorboard): installed, or one line saying how
    if "wandb" in asked:
        if s.wandb_project:
            os.environ["WANDB_PROJECT"] = s.wandb_project
        if not wandb_ready():
            raise UserError(
                "wandb logging is on, but WANDB_API_KEY is not set (env or .env) and there is no wandb login. "
                "Set WANDB_API_KEY, or WANDB_MODE=offline to log locally, or --report_to none."
            )
        os.environ.setdefault("WANDB_LOG_MODEL", "false")  # never upload checkpoints (or what they hold) to wandb
        # wandb records the command line in its run metadata: a password in a --judge_base_url would go with it.
        sys.argv[:] = [redact(a) for a in sys.argv]
    return asked[0] if len(asked) == 1 else asked


ACTIVATION_SHARE = 0.5  # gradient checkpointing stays off while a micro-batch's activations fit in this share


def activation_bytes(model, s, dtype: torch.dtype) -> int:
    """What one micro-batch's activations take without gradient checkpointing, at its worst (every row at
    max_length; with none, at the model's context length): per token and layer a Llama-style block keeps about 8
    hidden-sized and 4 intermediate-sized tensors for the backward (norm inputs, q/k/v, attention output; the
    MLP's input, gate, up, activation), and
    the LM head's fp32 logits and log-softmax take 2 x 4 bytes per vocabulary entry. Preference pairs are two rows.
    DPO's prefix sharing packs a pair into one row of up to 2 x max_length tokens whose 4D attention mask
    (alignkit.train.prefix) takes about (2 x max_length)^2 bytes as a bool, plus a float copy inside attention:
    counted too, though it stays near 1% of the rest (batch 4 at 8k tokens: 3 GiB of about 300).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    if getattr(s, "max_length", None):
        length = s.max_length
    elif hasattr(s, "max_completion_length"):  # rl.py: each prompt whole, answers up to max_completion_length
        length = (getattr(s, "max_prompt_length", None) or 512) + s.max_completion_length
    else:  # --max_length none: a row may be as long as the model reads
        length = getattr(config, "max_position_embeddings", None) or 4096
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
                f"{needed / 2**30:.1f} GiB, {'more' if on else 'no more'} than half of the {free / 2**30:.1f} GiB "
                f"free on {device.type}{ranks}; --gradient_checkpointing true|false to choose)")
    return on


# save_steps for TRL's save_strategy "no": a step no run reaches, so transformers saves only the last step (its
# DefaultFlowCallback saves there under the steps strategy).
LAST_STEP_ONLY = 2**31 - 1


def trl_config(config_cls, s, folder: Path, dtype: torch.dtype, model=None, **stage_kwargs):
    """TRL's SFTConfig/DPOConfig from alignkit's settings; --trainer_overrides (every TRL field given under its
    TRL name, alignkit.core.trl_names) goes on top. `model` (the loaded model) sizes --gradient_checkpointing
    auto; without it, checkpointing stays on. A notebook's training cell run again is refused here, first: building
    TRL's config resets accelerate's state, which the model trained by the cell's earlier run still uses."""
    check_training_cell(s, folder)
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
        report_to=resolve_report_to(s, quiet=True), bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
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
    for key in (k for k in stage_kwargs if k in extra and extra[k] != stage_kwargs[k]):  # the user's TRL name wins
        made = f"--train_on {s.train_on} made it" if key.endswith("only_loss") and hasattr(s, "train_on") else \
            "alignkit chose"
        logger.info(f"{key}: {extra[key]} as given in TRL's name, over {stage_kwargs[key]} ({made} that)")
    # A finished run without a checkpoint: its same command trained it again. Not under load_best_model_at_end, which
    # transformers checks against the strategies as given.
    if extra.get("save_strategy") == "no" and str(extra.get("load_best_model_at_end")).lower() not in ("true", "1"):
        logger.info("save_strategy no: no checkpoint until the last step, which is saved as one, so that the same "
                    "command run again trains nothing (--resume auto) and a crash after it loses nothing")
        extra = {**extra, "save_strategy": "steps", "save_steps": LAST_STEP_ONLY}
    kwargs.update(extra)
    try:
        # A copy: transformers edits fsdp_config in place (and TRL may edit other lists), which changed the
        # settings themselves (trainer_overrides saved so, and refused by start_run as changed since prepare_run).
        args = config_cls(**copy.deepcopy(kwargs))
    except (ValueError, TypeError) as e:  # what TRL or transformers checks across fields, in their words
        text = " ".join(str(e).split())
        raise ConfigError(f"TRL's {config_cls.__name__} refuses these settings: {text}") from None
    # The flag the warmup came from, for the warning that no step learns (alignkit.train.resuming)
    args.alignkit_warmup_flag = "--warmup_steps" if "warmup_steps" in extra else "--warmup_ratio"
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

    cell_checks.check_trainer_folder(trainer, folder)  # a notebook's earlier run's trainer: not this run's
    check_trained(folder, s)  # stopped, not trained here, or the settings changed since: refused before saving
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
    earlier = folder / "metrics.json"
    finished_before = getattr(trainer, "steps_at_start", None) == trainer.state.global_step and earlier.is_file()
    if finished_before:
        # The same command again after the run finished: no step trained, the same weights. Its metrics stay the
        # finished run's (TRL's summary of no step says train_loss 0.0), and so does the model's content (later
        # runs over it, rlaif.py's rounds, are not redone for a changed metrics.json).
        metrics = json.loads(earlier.read_text())
        logger.info(f"{stage}: no step left to train; the finished run's metrics stay in {earlier}")
    else:
        history = trainer.state.log_history
        metrics = {k: v for k, v in history[-1].items()} if history else {}
        if getattr(trainer, "logs_last_step", False):  # rl: the last step's log (reward, KL, time shares) beside
            last = [e for e in history[:-1] if e.get("step") == trainer.state.global_step and "loss" in e]
            metrics = {**(last[-1] if last else {}), **metrics}  # TRL's closing summary, which holds none of them
            # Each log counts the judge's requests since the last (alignkit.train.rl): the run's totals here, where
            # the closing log's own (none since the last step, now always logged) read 0 (the review of session 32).
            counted = {k for entry in history for k in entry if k.startswith("judge/")}
            metrics.update({k: sum(entry.get(k, 0) for entry in history) for k in sorted(counted)})
        if "train_loss" in metrics:
            metrics["train_loss"] = whole_run_train_loss(trainer.state.log_history,
                                                         getattr(trainer, "steps_at_start", None) or 0,
                                                         trainer.state.global_step, metrics["train_loss"])
        if trainer.eval_dataset is not None:
            metrics.update(final_evaluation(trainer))
        metrics["global_step"] = trainer.state.global_step
        metrics["num_processes"] = trainer.accelerator.num_processes
        metrics.update(measured or {})
        if trainer.accelerator.is_main_process:
            write_atomic(earlier, json.dumps(metrics, indent=2))
    if trainer.accelerator.is_main_process:
        logger.info(f"{stage} adapter saved to {folder}")
    voted = getattr(trainer, "sigterm_everywhere", sigterm_asked)
    if voted():  # it came after the last step's end (the final evaluation): the finished run is saved first
        # In an rlaif round the step's own command ends in --resume false: how to go on is the round's (STEP_AGAIN).
        then = (f"{run_again()} to go on from it" if os.environ.get(STEP_AGAIN)
                else "the same command merges, pushes and reports it")
        stop_for_sigterm(f"SIGTERM as the training ended: the run is saved in {folder}; {then}")
    merged = hub_url = None
    if trainer.accelerator.is_main_process and (s.merge_adaptors or s.push_to_hub):
        merged, hub_url = publish_run(folder, s)
    if trainer.accelerator.is_main_process:  # training.png and the closing summary (alignkit.train.report)
        from alignkit.train.report import report

        report(trainer, stage, folder, metrics, merged=merged, hub_url=hub_url, finished_before=finished_before)
    return metrics


def final_evaluation(trainer) -> dict:
    """The trained model's held-out figures: those the schedule logged at the last step where it evaluated there
    (eval_strategy epoch over one epoch, eval_steps landing on max_steps: the whole held-out pass ran twice, the
    README audit of session 32), else trainer.evaluate(). Every rank decides alike (each keeps the log), as the
    evaluation is a collective. Under load_best_model_at_end the model is another step's: evaluated anew."""
    step = trainer.state.global_step
    logged: dict = {}
    if not getattr(trainer.args, "load_best_model_at_end", False):
        for entry in reversed(trainer.state.log_history):
            if entry.get("step") != step:
                break
            logged.update({k: v for k, v in entry.items() if k.startswith("eval_") and k not in logged})
    return logged if "eval_loss" in logged or any(k.endswith("_loss") for k in logged) else trainer.evaluate()


def whole_run_train_loss(log_history: list[dict], steps_at_start: int, global_step: int, call_loss: float) -> float:
    """The run's mean training loss over all its steps. transformers' summary `train_loss` is the mean over the steps
    trained in this call: after a resume at step 40 of 60, over the last 20 only, and 0.0 where the run was resumed
    at its last step (killed after its last checkpoint, before it wrote metrics.json). The steps before the resume
    count at the mean of the losses logged for them (each a mean over its logging interval, weighted by its length):
        (mean_logged_before * steps_at_start + call_loss * (global_step - steps_at_start)) / global_step
    Exact where the resumed checkpoint's step is a logging step (the presets' save_steps are multiples of
    logging_steps); where nothing was logged before the resume, the call's own mean."""
    trained = global_step - steps_at_start
    if steps_at_start <= 0 or global_step <= 0:
        return call_loss
    previous, weighted, covered = 0, 0.0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and previous < step <= steps_at_start:
            weighted += entry["loss"] * (step - previous)
            covered += step - previous
            previous = step
    if not covered:
        return call_loss
    return (weighted / covered * steps_at_start + call_loss * trained) / global_step


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
        from alignkit.core.zero3 import outside_zero3

        with outside_zero3():  # the main process alone builds the whole model: not under ZeRO-3's zero.Init
            target = merged = merge_adapters(str(folder), folder / "merged", dtype=s.dtype,
                                             trust_remote_code=s.trust_remote_code)
        logger.info(f"merged model saved to {target}")
    if s.push_to_hub:
        url = push(target, s.hub_repo_id, private=not s.hub_public, name=folder.name)
    return merged, url
