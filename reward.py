# %% [markdown]
# # Reward model: score answers with a LoRA adapter and a one-output head
#
# A reward model reads a conversation and returns one number; trained on preference pairs, the chosen answer
# should score above the rejected one. It is the base model with a sequence-classification head of one output
# ("score") in place of the LM head, and a LoRA adapter (QLoRA on a 4-bit base); the head is trained in full and
# saved with the adapter. TRL's RewardTrainer runs the training. Uses: `label.py --judge rm:RUN_FOLDER` labels
# pairs with it, and `alignkit.feedback.rewards.load("rm:RUN_FOLDER")` gives online RL one reward callable.
#
# Losses (`--loss`, formulas in alignkit.train.reward): `bradley_terry` (TRL's, with `--center_rewards_coefficient`),
# `logexp` (OpenRLHF's LogExpLoss), `logexpwithlm` (the self-reference code's: logexp with the row's margin,
# plus `--lm_loss_coef` times the chosen sequence's LM loss). A 'margin' column is subtracted as TRL does;
# `--use_margin true` takes the scores' difference where there is none, `--use_margin false` none.
#
# ```bash
# python reward.py --preset tiny                                   # offline CPU demo, about a minute
# python reward.py --model_id runs/sft-model/merged                # Mistral-7B QLoRA on UltraFeedback (GPU)
# python reward.py --loss logexpwithlm --use_margin --dataset_id runs/label-x/preferences.jsonl
# python reward.py --dataset_id Anthropic/hh-rlhf --center_rewards_coefficient 0.01
# python label.py --preset tiny --judge rm:runs/tiny-reward        # the reward model as a judge
# python reward.py --help                                          # every setting, its default and env var
# ```

# %% [markdown]
# ## Settings
# Defaults < `--preset` < `.env` < environment < `--config recipe.yaml` < flags < `overrides`. In a notebook,
# set `overrides` below (or environment variables) instead of touching argv.

# %%
from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import RewardSettings
from alignkit.core.launch import establish_launch
from alignkit.modeling import presets
from alignkit.train.training import preflight

# In a notebook, set things here instead of on a command line, e.g. overrides = {"preset": "tiny", "loss": "logexp"};
# environment variables (ALIGNKIT_<NAME>, e.g. ALIGNKIT_MAX_STEPS=20) work too. Flags on a command line apply as well.
overrides: dict = {}

settings = parse_config(
    RewardSettings, overrides=overrides, presets={"tiny": presets.defaults("reward")}, prog="reward.py",
    description="Reward model with LoRA/QLoRA.",
)
presets.ensure(settings)
establish_launch(settings, "reward.py")  # the process's device, the process group, what this launch refuses
preflight(settings)  # a push's token and base, wandb's key, the Hub: checked now, not after hours of training

# %% [markdown]
# ## Data
# Any supported preference format becomes prompt / chosen / rejected (messages, or TRL's standard texts); with
# a `margin` column (or `--use_margin true`) each pair also gets its margin, from its own row. The held-out pairs are
# `--dataset_test_split`'s (a TRL line that evaluates: the dataset's test split where it has one, as TRL's script),
# else a seeded share of prompts (`--eval_split`, every pair of each), to measure pairwise accuracy on unseen prompts.

# %%
from alignkit.core.mixture import load_train_eval
from alignkit.train.loss_mask import check_chat_template
from alignkit.train.reward import pairs_loader

train_data, eval_data = load_train_eval("preference", settings, load=pairs_loader(settings))
check_chat_template(settings, train_data)  # tool calls under a template that drops them: refused before the load
print(f"{len(train_data)} training pairs, {len(eval_data) if eval_data else 0} held out")

# %% [markdown]
# ## Run folder
# Everything goes to `output_dir/run_name`. A rerun with the same settings continues from the last checkpoint.
# Nothing is written yet: the folder is claimed when training starts, its settings saved then (secrets redacted).

# %%
from alignkit.train.training import prepare_run

run_folder, resume_from = prepare_run(settings, "reward", train_data, eval_data)

# %% [markdown]
# ## Model
# The one loader, with a score head of one output instead of the LM head (a fresh one starts at zero). A LoRA adapter
# of task type SEQ_CLS goes on top; PEFT trains the score head in full and saves it with the adapter. For
# `logexpwithlm` the base's LM head is kept beside it, frozen, for the LM term.

# %%
from alignkit.modeling.models import add_trainable_adapter, load_model, require_chat_template
from alignkit.modeling.reward_models import load_lm_head
from alignkit.train.reward import zero_fresh_score_head

from transformers import set_seed

set_seed(settings.seed)  # the fresh score head is drawn while the model loads: seed it, as TRL does
loaded = load_model(settings, for_training=True, reward=True)
zero_fresh_score_head(loaded.model, settings.model_id)
require_chat_template(loaded.tokenizer, settings.model_id, train_data)  # conversational data only
model = add_trainable_adapter(loaded, settings, task_type="SEQ_CLS")
model.print_trainable_parameters()
lm_head = load_lm_head(loaded.base_id, model, settings.revision) if settings.loss == "logexpwithlm" and \
    settings.lm_loss_coef else None

# %% [markdown]
# ## Train
# TRL's RewardTrainer tokenizes prompt + answer (through the chat template, or as text) and scores both answers
# in one batch.

# %%
from trl import RewardConfig

from alignkit.train.reward import AlignRewardTrainer
from alignkit.train.training import start_run, trl_config

args = trl_config(RewardConfig, settings, run_folder, loaded.dtype, model)
# The folder is claimed here: an earlier run in it is moved aside, and back if this fails before a checkpoint.
with start_run(settings, run_folder, resume_from, model, (train_data, eval_data)):
    trainer = AlignRewardTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, processing_class=loaded.tokenizer,
        loss=settings.loss, lm_loss_coef=settings.lm_loss_coef, lm_head=lm_head,
    )
    trainer.train(resume_from_checkpoint=resume_from)

# %% [markdown]
# ## Save, evaluate, merge, push
# The adapter (with its score head) and tokenizer go to the run folder. On the held-out pairs: pairwise accuracy
# (chance is 0.5), chosen / rejected / margin means and standard deviations, `rewards_histogram.png`, and each
# scored pair with its rewards (and its margin, where margins are used) in `held_out_pairs.jsonl`.
# `--merge_adaptors` writes a merged model that loads with AutoModelForSequenceClassification.
# `training.png` in the run folder draws the logged curves (loss, pairwise accuracy, train and held-out) and the
# learning rate; a summary block (steps, wall time, where everything went) ends the run, and in a notebook the
# picture shows below this cell.

# %%
from alignkit.train.reward import held_out_pairs, held_out_report, scores_held_out
from alignkit.train.training import finish

# The held-out report first, so that metrics.json, the model card and the summary carry its accuracy: the share of
# the held-out pairs ranked right (the logged eval_accuracy counts each pair once too, whatever the batches), over
# the pairs TRL kept (one longer than --max_length is left out, as TRL dropped it; the line says how many).
main = trainer.accelerator.is_main_process
report = {}
if eval_data is not None and scores_held_out(main):  # FSDP/ZeRO-3: every rank takes part in each forward
    report = held_out_report(trainer.model, loaded.tokenizer, eval_data, run_folder,
                             settings.per_device_eval_batch_size, settings.max_length, write=main, settings=settings,
                             trainer=trainer)
# How its rows were written and its base loaded: a judge (rm:FOLDER) scores the way it trained, a copy pushed to the
# Hub too (alignkit.feedback.rewards).
from alignkit.core.data import is_text_dataset
from alignkit.feedback.rewards import LENGTH_KEY, QUANTIZATION_KEY, ROWS_KEY

rows = {ROWS_KEY: "text" if is_text_dataset(train_data) else "conversations", QUANTIZATION_KEY: loaded.quantization,
        LENGTH_KEY: settings.max_length}
if loaded.quantization == "4bit":  # the 4-bit format its base was rounded to
    rows |= {"bnb_4bit_quant_type": settings.bnb_4bit_quant_type, "use_bnb_nested_quant": settings.use_bnb_nested_quant}
metrics = finish(trainer, loaded, settings, run_folder, "reward", measured={**report, **rows} if main else None)
print(f"adapter: {run_folder}")
if report and main:
    print(f"held-out accuracy: {report['held_out_accuracy']:.3f} ({held_out_pairs(report, settings.max_length)})")
    print(f"chosen {report['chosen_mean']:.3f} ± {report['chosen_std']:.3f}, rejected {report['rejected_mean']:.3f} "
          f"± {report['rejected_std']:.3f}, margin {report['margin_mean']:.3f} ± {report['margin_std']:.3f}")
    print(f"histogram: {report['histogram']}")

from alignkit.train.report import show

show(run_folder, *([report["histogram"]] if report else []))  # in a notebook: training.png and the histogram
