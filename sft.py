# %% [markdown]
# # SFT: supervised fine-tuning with a LoRA adapter
#
# TRL's SFTTrainer trains a fresh LoRA adapter (QLoRA when the base is loaded in 4 bits) on conversations,
# prompt/completion pairs or plain text. Where the data allows, the loss covers only what the model should
# learn to say: the completions, or the assistant turns.
#
# ```bash
# python sft.py --preset tiny                                   # offline CPU demo, about a minute
# python sft.py --dataset_id HuggingFaceH4/ultrachat_200k       # Mistral-7B QLoRA (GPU)
# python sft.py --dataset_id chats.jsonl --lora_r 32 --max_steps 500
# python sft.py --preset tiny --adapter lota --lota_sparsity 0.9  # LoTA: a sparse delta instead of LoRA
# python sft.py --config alignment-handbook/recipes/zephyr-7b-beta/sft/config_qlora.yaml  # its recipe, as it is
# python sft.py --help                                          # every setting, its default and env var
# ```

# %% [markdown]
# ## Settings
# Defaults < `--preset` < `.env` < environment < `--config recipe.yaml` < flags < `overrides`. In a notebook,
# set `overrides` below (or environment variables) instead of touching argv.

# %%
from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import SFTSettings
from alignkit.core.launch import establish_launch
from alignkit.modeling import presets
from alignkit.train.training import preflight

# In a notebook, set things here instead of on a command line, e.g. overrides = {"preset": "tiny", "max_steps": 20};
# environment variables (ALIGNKIT_<NAME>, e.g. ALIGNKIT_MAX_STEPS=20) work too. Flags on a command line apply as well.
overrides: dict = {}

settings = parse_config(
    SFTSettings, overrides=overrides, presets={"tiny": presets.defaults("sft")}, prog="sft.py",
    description="SFT with LoRA/QLoRA.",
)
presets.ensure(settings)
establish_launch(settings, "sft.py")  # the process's device, the process group, what this launch refuses
preflight(settings)  # a push's token and base, wandb's key, the Hub: checked now, not after hours of training

# %% [markdown]
# ## Data
# Messages, ShareGPT conversations, prompt/completion or plain text, normalised to what TRL reads.

# %%
from alignkit.core.mixture import load_train_eval
from alignkit.train.loss_mask import check_loss_mask

# --dataset_id with an --eval_split share or its --dataset_test_split, or an alignment-handbook dataset_mixture
train_data, eval_data = load_train_eval("sft", settings)
check_loss_mask(settings, train_data)  # loss masks and TRL's end tokens against rows and template, before the load
print(f"{len(train_data)} training examples, {len(eval_data) if eval_data else 0} held out")

# %% [markdown]
# ## Run folder
# Everything goes to `output_dir/run_name`. A rerun with the same settings continues from the last checkpoint.
# Nothing is written yet: the folder is claimed when training starts, with settings, data and model checked
# (a LoTA run reads its mask from here when it resumes).

# %%
from alignkit.train.training import prepare_run

run_folder, resume_from = prepare_run(settings, "sft", train_data, eval_data)

# %% [markdown]
# ## Model
# One loader for every script; a fresh LoRA adapter goes on top. With `--adapter lota`, a sparse delta instead
# (Lottery Ticket Adaptation, alignkit.train.lota): dense at first, for the calibration steps that find its mask.

# %%
from alignkit.modeling.models import add_trainable_adapter, load_model, require_chat_template
from alignkit.train import lota, lota_mask

loaded = load_model(settings, for_training=True)
require_chat_template(loaded.tokenizer, settings.model_id, train_data)  # conversational data only
if settings.adapter == "lota":
    model = lota.add_trainable_delta(loaded, settings, run_folder, resume_from)
else:
    model = add_trainable_adapter(loaded, settings)
    model.print_trainable_parameters()

# %% [markdown]
# ## Train
# With `--adapter lota`: calibrate (dense steps on this data and loss), keep the 1 - sparsity largest changes as
# the mask, go back to the starting weights and train only the masked entries.

# %%
from trl import SFTConfig

from alignkit.train.loss_mask import loss_mask_settings
from alignkit.train.trainers import AlignSFTTrainer
from alignkit.train.training import start_run, trl_config

args = trl_config(
    SFTConfig, settings, run_folder, loaded.dtype, model,
    **loss_mask_settings(settings, train_data, loaded.tokenizer),  # what the loss covers: recorded, for the card
)
trainer_class = lota.trainer_class(AlignSFTTrainer) if settings.adapter == "lota" else AlignSFTTrainer


def make_trainer(args):
    return trainer_class(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
        processing_class=loaded.tokenizer, frozen_adapters=loaded.frozen,
    )


# The folder is claimed here: an earlier run in it is moved aside, and back if this fails before a checkpoint.
with start_run(settings, run_folder, resume_from, model, (train_data, eval_data)):
    if settings.adapter == "lota":  # calibrate and mask, unless --lota_mask (or this run's resumed mask) gives it
        lota_mask.calibrate(model, settings, run_folder, make_trainer, args)
    trainer = make_trainer(args)
    trainer.train(resume_from_checkpoint=resume_from)

# %% [markdown]
# ## Save, evaluate, merge, push
# `training.png` in the run folder draws the logged curves (loss, held-out loss) and the learning rate; a summary
# block (steps, wall time, where everything went) ends the run, and in a notebook the picture shows below this
# cell.

# %%
from alignkit.train.training import finish

metrics = finish(trainer, loaded, settings, run_folder, "sft")
print(f"adapter: {run_folder}")
if "eval_loss" in metrics:
    print(f"held-out loss: {metrics['eval_loss']:.3f}")

from alignkit.train.report import show

show(run_folder)  # in a notebook: training.png (loss, learning rate, the run's own curves) below this cell
