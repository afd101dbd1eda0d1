# %% [markdown]
# # DPO: align a model to preferences with a LoRA adapter
#
# Direct Preference Optimization (Rafailov et al. 2023) on TRL's DPOTrainer: the policy is the model plus a
# fresh LoRA adapter, and the reference is the same model with that adapter switched off, so no second copy
# is loaded. Started from an SFT adapter, the SFT adapter stays frozen under the new one and is part of the
# reference. Losses: `sigmoid` (DPO; with `--label_smoothing` it is conservative DPO), `ipo`, and any other
# TRL loss by name, alone or combined with `--loss_weights`; `simpo` (SimPO) and `orpo` (ORPO) need no reference
# model at all, so no reference pass runs.
#
# ```bash
# python dpo.py --preset tiny                                  # offline CPU demo, about a minute
# python dpo.py --preset tiny --model_id runs/tiny-sft         # DPO on top of the SFT adapter
# python dpo.py --preset smol                                  # SmolLM2-135M on label.py --preset smol's labels
# python dpo.py --model_id model.Q4_K_M.gguf --dataset_id p.jsonl  # a GGUF base, converted once (alignkit.modeling.gguf)
# python dpo.py --dpo_beta 0.1                                 # Mistral-7B QLoRA on UltraFeedback (GPU)
# DPO_BETA=0.1 python dpo.py                                   # the same, from the environment
# python dpo.py --loss_type ipo --dpo_beta 0.5
# python dpo.py --label_smoothing 0.1                          # cDPO
# python dpo.py --preset tiny --loss_type simpo                # SimPO: no reference pass (orpo: ORPO)
# python dpo.py --preset tiny --adapter lota --lota_sparsity 0.9  # LoTA: a sparse delta instead of LoRA
# python dpo.py --dataset_id prefs.jsonl --merge_adaptors --push_to_hub --hub_repo_id you/model-dpo
# python dpo.py --config alignment-handbook/recipes/zephyr-7b-beta/dpo/config_qlora.yaml  # its recipe, as it is
# python dpo.py --model_name_or_path Qwen/Qwen2-0.5B-Instruct --use_peft --beta 0.1  # TRL's names work too
# python dpo.py --help                                         # every setting, its default and env var
# ```

# %% [markdown]
# ## Settings
# Defaults < `--preset` < `.env` < environment < `--config recipe.yaml` < flags < `overrides`. In a notebook,
# set `overrides` below (or environment variables) instead of touching argv.

# %%
from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import DPOSettings
from alignkit.core.launch import establish_launch
from alignkit.modeling import presets
from alignkit.train.training import preflight

# In a notebook, set things here instead of on a command line, e.g. overrides = {"preset": "tiny", "model_id":
# "runs/tiny-sft", "dpo_beta": 0.2} (on top of sft.py's tiny run, as on the README); environment variables
# (ALIGNKIT_<NAME>, e.g. ALIGNKIT_MAX_STEPS=20) work too. Flags on a command line apply as well.
overrides: dict = {}

settings = parse_config(
    DPOSettings, overrides=overrides, presets=presets.named("dpo"), prog="dpo.py",
    description="DPO with LoRA/QLoRA.",
)
presets.ensure(settings)
establish_launch(settings, "dpo.py")  # the process's device, the process group, what this launch refuses
preflight(settings)  # a push's token and base, wandb's key, the Hub: checked now, not after hours of training

# %% [markdown]
# ## Data
# Any supported preference format becomes prompt / chosen / rejected (messages, or TRL's standard texts); a
# seeded share of prompts (every pair of each) is held out to measure reward accuracy on prompts never trained on.

# %%
from alignkit.core.mixture import load_train_eval
from alignkit.train.loss_mask import check_chat_template

# --dataset_id with an --eval_split share or its --dataset_test_split, or an alignment-handbook dataset_mixture
train_data, eval_data = load_train_eval("preference", settings)
check_chat_template(settings, train_data)  # tool calls under a template that drops them: refused before the load
print(f"{len(train_data)} training pairs, {len(eval_data) if eval_data else 0} held out")

# %% [markdown]
# ## Run folder
# Everything goes to `output_dir/run_name`. A rerun with the same settings continues from the last checkpoint.
# Nothing is written yet: the folder is claimed when training starts, with settings, data and model checked
# (a LoTA run reads its mask from here when it resumes).

# %%
from alignkit.train.training import prepare_run

run_folder, resume_from = prepare_run(settings, "dpo", train_data, eval_data)

# %% [markdown]
# ## Model
# One loader for every script: a Hub id, a local folder or an adapter folder; 4-bit NF4 on CUDA by default.
# A fresh LoRA adapter goes on top; anything the model was loaded with stays frozen. With `--adapter lota`, a
# sparse delta instead (Lottery Ticket Adaptation, alignkit.train.lota), dense for the calibration steps at first.

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
# The reference pass runs with the trained adapter off (see alignkit.train.trainers); a LoTA delta is switched off
# the same way. LoTA first calibrates with the DPO loss, keeps the largest changes as its mask, and starts over.

# %%
from trl import DPOConfig

from alignkit.train.trainers import AlignDPOTrainer
from alignkit.train.training import start_run, trl_config

args = trl_config(DPOConfig, settings, run_folder, loaded.dtype, model)  # --dpo_beta is DPOConfig.beta, and so on
trainer_class = lota.trainer_class(AlignDPOTrainer) if settings.adapter == "lota" else AlignDPOTrainer


def make_trainer(args):
    return trainer_class(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
        processing_class=loaded.tokenizer, frozen_adapters=loaded.frozen,
        reference_adapters=settings.reference_adapters, prefix_sharing=settings.prefix_sharing,
        simpo_gamma=settings.simpo_gamma, cpo_alpha=settings.cpo_alpha,
    )


# The folder is claimed here: an earlier run in it is moved aside, and back if this fails before a checkpoint.
with start_run(settings, run_folder, resume_from, model, (train_data, eval_data)):
    if settings.adapter == "lota":  # calibrate and mask, unless --lota_mask (or this run's resumed mask) gives it
        lota_mask.calibrate(model, settings, run_folder, make_trainer, args)
    trainer = make_trainer(args)
    trainer.train(resume_from_checkpoint=resume_from)

# %% [markdown]
# ## Save, evaluate, merge, push
# The adapter and tokenizer go to the run folder; `--merge_adaptors` also writes a checked, merged model.
# `training.png` in the run folder draws the logged curves (loss, reward margins and accuracies, train and
# held-out) and the learning rate; a summary block (steps, wall time, where everything went) ends the run, and in a
# notebook the picture shows below this cell.

# %%
from alignkit.train.training import finish

metrics = finish(trainer, loaded, settings, run_folder, "dpo")
print(f"adapter: {run_folder}")
if "eval_rewards/accuracies" in metrics:
    from alignkit.train.report import reward_accuracy

    print(f"held-out reward accuracy: {reward_accuracy(metrics)}")  # with the pairs tied, where any

from alignkit.train.report import show

show(run_folder)  # in a notebook: training.png (loss, learning rate, the run's own curves) below this cell
