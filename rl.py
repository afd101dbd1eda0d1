# %% [markdown]
# # RL: online GRPO / RLOO with a rule, a judge or a reward model as the reward
#
# Online alignment on TRL's GRPOTrainer and RLOOTrainer: the policy (the model plus a fresh LoRA adapter, any
# SFT adapter frozen under it) samples `--num_generations` answers per prompt, each is rewarded, and the policy
# moves towards the answers that beat their group. The KL term (`--beta`) pulls towards the reference: the same
# model with the trained adapter off, so no second copy is loaded. Rewards: the preset's `rule`, an
# OpenAI-compatible `judge` (FastChat's single-answer `[[rating]]` prompt, or pairwise against reference
# answers; cached like label.py's), a reward.py model `rm:FOLDER`, or your own `python:module:function`.
#
# ```bash
# python rl.py --preset tiny --model_id runs/tiny-sft                      # offline CPU demo: GRPO on the rule
# python rl.py --preset tiny --model_id runs/tiny-sft --algo rloo
# python rl.py --preset tiny --model_id runs/tiny-sft --reward rule,rm:runs/tiny-reward --reward_weights 1,0.5
# python rl.py --model_id runs/sft-mistral --dataset_id prompts.jsonl --reward judge \
#     --judge_base_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct --parallel 32
# python rl.py --reward judge --judge_mode pairwise --reference_completions teacher.jsonl --judge_model gpt-4o-mini
# python rl.py --reward python:verify.py:reward                            # reward(prompts, completions, **kw)
# python rl.py --help                                                      # every setting, its default and env var
# ```

# %% [markdown]
# ## Settings
# Defaults < `--preset` < `.env` < environment < `--config recipe.yaml` < flags < `overrides`.

# %%
from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import RLSettings
from alignkit.core.launch import establish_launch
from alignkit.modeling import presets
from alignkit.train.training import preflight

# In a notebook, set things here instead of on a command line, e.g. the offline demo on sft.py's tiny run:
# overrides = {"preset": "tiny", "model_id": "runs/tiny-sft", "beta": 0.02}; environment variables
# (ALIGNKIT_<NAME>, e.g. ALIGNKIT_MAX_STEPS=20) work too. Flags on a command line apply as well.
overrides: dict = {}

settings = parse_config(
    RLSettings, overrides=overrides, presets={"tiny": presets.defaults("rl")}, prog="rl.py",
    description="Online GRPO/RLOO with LoRA/QLoRA, rewarded by a rule, a judge, a reward model or a function.",
)
presets.ensure(settings)
establish_launch(settings, "rl.py")  # the process's device, the process group, what this launch refuses
preflight(settings)  # a push's token and base, wandb's key, the Hub: checked now, not after hours of training

# %% [markdown]
# ## Prompts
# A file or Hub dataset, read as label.py reads `--prompts` (`--prompt_field` holds text or messages); every row
# trains, repeats included, as in TRL. Read first: a bad row fails at once (`--skip_invalid` skips such rows and says
# how many), and a checkpoint resumes only over the same rows.

# %%
from alignkit.train.loss_mask import check_chat_template
from alignkit.train.rl import load_prompt_dataset

prompts = load_prompt_dataset(settings)  # a single file has no splits: --dataset_split is refused, not ignored
check_chat_template(settings, prompts)  # tool calls under a template that drops them: refused before the load
print(f"{len(prompts)} prompts")

# %% [markdown]
# ## Run folder
# Everything goes to `output_dir/run_name`. A rerun with the same settings continues from the last checkpoint.
# Nothing is written yet: the folder is claimed when training starts, its settings saved then (secrets redacted).

# %%
from alignkit.train.training import prepare_run

run_folder, resume_from = prepare_run(settings, "rl", prompts)

# %% [markdown]
# ## Rewards
# Built before the model loads, so a bad spec, a missing judge key or a prompt a reward cannot score (a
# conversation for a reward model trained on texts) fails at once. A failed or unparseable
# judgment scores nothing (NaN): that completion is left out of its group's baseline and gets advantage 0; the
# failures are counted in the logs (`judge/failed`, `judge/unparsed`, `rewards/unscored_frac`). Your function may
# return None where its reward does not apply: as in TRL, the other rewards are summed without it.

# %%
from alignkit.train.rl_rewards import build_rewards, check_rewards_take

rewards = build_rewards(settings, run_folder)
check_rewards_take(rewards, prompts)  # e.g. a conversation for a reward model trained on texts
print(f"rewards: {', '.join(r.__name__ for r in rewards)}", flush=True)  # whole, beside other ranks' output

# %% [markdown]
# ## Model
# One loader for every script; a fresh LoRA adapter goes on top, anything the model was loaded with stays frozen.

# %%
from alignkit.modeling.models import add_trainable_adapter, load_model

loaded = load_model(settings, for_training=True)
model = add_trainable_adapter(loaded, settings)
model.print_trainable_parameters()

# %% [markdown]
# ## Train
# The prompts go through the model's chat template (text too, where it has one; a model without one gets text
# prompts as they are, TRL's standard format). Generation runs on vLLM on a GPU (`--backend vllm`, colocated by
# default), else on transformers. The logs show
# the reward's mean and std, the KL to the reference, completion lengths, and the share of each step spent
# generating, judging and training (`time/*_share`).

# %%
from alignkit.train.rl import as_trl_prompts, trainer_class, trl_args
from alignkit.train.training import start_run

args = trl_args(settings, run_folder, loaded.dtype, model)
train_prompts = as_trl_prompts(prompts, loaded.tokenizer, settings.model_id)  # `prompts` stays as read
# The folder is claimed here: an earlier run in it is moved aside, and back if this fails before a checkpoint.
# The model and the rewards must have been built under these settings (the Model and Rewards cells run after them).
with start_run(settings, run_folder, resume_from, model, (prompts,), built=[(rewards, "rewards")]):
    trainer = trainer_class(settings.algo)(
        model=model, reward_funcs=rewards, args=args, train_dataset=train_prompts, processing_class=loaded.tokenizer,
        frozen_adapters=loaded.frozen,
    )
    trainer.train(resume_from_checkpoint=resume_from)

# %% [markdown]
# ## Save, merge, push
# The adapter and tokenizer go to the run folder, as dpo.py's do: merge.py and evaluate.py take it the same way.
# `training.png` in the run folder draws the logged curves (loss, reward, KL to the reference) and the learning
# rate; a summary block (steps, wall time, where everything went) ends the run, and in a notebook the picture shows
# below this cell.

# %%
from collections import Counter

from alignkit.train.rl import reward_summary
from alignkit.train.training import finish

metrics = finish(trainer, loaded, settings, run_folder, "rl")
for reward in rewards:
    if hasattr(reward, "close"):
        reward.close()
print(f"adapter: {run_folder}")
if said := reward_summary(trainer.state.log_history):  # the logs that had a reward (a reused batch logs none)
    print(said)
unscored = [entry["rewards/unscored_frac"] for entry in trainer.state.log_history if "rewards/unscored_frac" in entry]
if unscored and max(unscored) > 0:
    print(f"unscored completions (a failed judgment, or None from every reward; left out of the advantages): up "
          f"to {max(unscored):.0%} of a log")
judged = Counter()  # each log counts its own requests: summed, the run's (a resumed run's logs included)
for entry in trainer.state.log_history:
    judged.update({k.removeprefix("judge/"): v for k, v in entry.items() if k.startswith("judge/")})
if judged:
    print(f"judge: {judged['requests']} requests, {judged['cached']} of them from the cache, {judged['failed']} failed, "
          f"{judged['unparsed']} without a rating")

from alignkit.train.report import show

show(run_folder)  # in a notebook: training.png (loss, learning rate, the run's own curves) below this cell
