# %% [markdown]
# # KTO: align a model to labelled answers with a LoRA adapter
#
# Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on TRL's KTOTrainer: each answer is labelled desirable
# or undesirable on its own, no pair needed (label.py's pointwise grades, or preference pairs split in two).
# The policy is the model plus a fresh LoRA adapter, and the reference is the same model with that adapter
# switched off; started from an SFT adapter, it stays frozen under the new one and is part of the reference.
#
# ```bash
# python kto.py --preset tiny                                   # offline CPU demo: the preset's pairs, split
# python kto.py --preset tiny --model_id runs/tiny-sft          # KTO on top of the SFT adapter
# python kto.py --dataset_id labels.jsonl                       # label.py --pointwise output (prompt, completion, label)
# python kto.py --desirable_weight 1.33                         # fewer desirable answers than undesirable ones
# python kto.py --beta 0.1                                      # Mistral-7B QLoRA on trl-lib/kto-mix-14k (GPU)
# python kto.py --help                                          # every setting, its default and env var
# ```

# %% [markdown]
# ## Settings
# Defaults < `--preset` < `.env` < environment < `--config recipe.yaml` < flags < `overrides`.

# %%
from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import KTOSettings
from alignkit.core.launch import establish_launch
from alignkit.modeling import presets
from alignkit.train.training import preflight

# In a notebook, set things here instead of on a command line, e.g. overrides = {"preset": "tiny", "beta": 0.2};
# environment variables (ALIGNKIT_<NAME>, e.g. ALIGNKIT_MAX_STEPS=20) work too. Flags on a command line apply as well.
overrides: dict = {}

settings = parse_config(
    KTOSettings, overrides=overrides, presets=presets.named("kto"), prog="kto.py", description="KTO with LoRA/QLoRA.",
)
presets.ensure(settings)
establish_launch(settings, "kto.py")  # the process's device, the process group, what this launch refuses
preflight(settings)

# %% [markdown]
# ## Data
# Labelled answers (prompt, completion, label true/false), or preference pairs in any supported format, each
# pair becoming a desirable and an undesirable answer; a seeded share is held out.

# %%
from alignkit.core.mixture import load_train_eval
from alignkit.train.loss_mask import check_chat_template

# --dataset_id with an --eval_split share or its --dataset_test_split, or an alignment-handbook dataset_mixture
train_data, eval_data = load_train_eval("unpaired", settings)
check_chat_template(settings, train_data)  # tool calls under a template that drops them: refused before the load
desirable = sum(train_data["label"])
print(f"{len(train_data)} training answers ({desirable} desirable), {len(eval_data) if eval_data else 0} held out")

# %% [markdown]
# ## Run folder and model
# As dpo.py: one loader (Hub id, local folder, adapter folder, GGUF; 4-bit NF4 on CUDA by default), a fresh
# LoRA adapter on top, anything the model was loaded with frozen.

# %%
from alignkit.modeling.models import add_trainable_adapter, load_model, require_chat_template
from alignkit.train.training import prepare_run

run_folder, resume_from = prepare_run(settings, "kto", train_data, eval_data)
loaded = load_model(settings, for_training=True)
require_chat_template(loaded.tokenizer, settings.model_id, train_data)  # conversational data only
model = add_trainable_adapter(loaded, settings)
model.print_trainable_parameters()
tiny = before = None  # measured on this model by the next cell (the tiny preset), not by an earlier model

# %% [markdown]
# ## Rule-following before training (the tiny preset)
# The preset's rule (alignkit.modeling.presets.follows_rule) checks each sampled answer: the share that follow it.

# %%
from alignkit import logger
from alignkit.core.data import load_rows
from alignkit.core.launch import sharded_launch
from alignkit.train.kto import rule_following

tiny = settings.preset == "tiny"
if tiny and sharded_launch():  # each process holds a shard of the weights: none can sample on its own
    logger.info(f"rule-following is not measured under {sharded_launch()}: the weights are sharded across "
                "processes; a one-process, DDP or ZeRO-2 run measures it")
    tiny = False
if tiny and not getattr(loaded.tokenizer, "chat_template", None):  # the rule is checked on chat answers
    logger.info(f"rule-following is not measured: {settings.model_id} has no chat template to sample chats with")
    tiny = False
if tiny:
    prompts = [row["prompt"] for row in load_rows(presets.paths()["prompts"])[0]]
    before = rule_following(model, loaded.tokenizer, prompts)
    print(f"rule-following before KTO: {before:.3f}")

# %% [markdown]
# ## Train
# TRL's KTO loss; the reference pass runs with the trained adapter off (alignkit.train.kto).

# %%
from trl import KTOConfig

from alignkit.train.kto import AlignKTOTrainer
from alignkit.train.training import start_run, trl_config

args = trl_config(KTOConfig, settings, run_folder, loaded.dtype, model, beta=settings.beta,
                  desirable_weight=settings.desirable_weight, undesirable_weight=settings.undesirable_weight)
with start_run(settings, run_folder, resume_from, model, (train_data, eval_data)):
    trainer = AlignKTOTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, processing_class=loaded.tokenizer,
        frozen_adapters=loaded.frozen, reference_adapters=settings.reference_adapters,
    )
    trainer.train(resume_from_checkpoint=resume_from)

# %% [markdown]
# ## Save, evaluate, merge, push
# The adapter and tokenizer go to the run folder; `--merge_adaptors` also writes a checked, merged model.
# `training.png` in the run folder draws the logged curves (loss, rewards of desirable and undesirable answers,
# KL) and the learning rate; a summary block ends the run. With the tiny preset, the rule-following share is
# measured again on the trained model, beside the share the cell before training measured.

# %%
from alignkit.train.training import finish

metrics = finish(trainer, loaded, settings, run_folder, "kto")
print(f"adapter: {run_folder}")
if tiny:
    after = rule_following(model, loaded.tokenizer, prompts)
    print(f"rule-following after KTO: {after:.3f} (before: {before:.3f})")
elif tiny is None and settings.preset == "tiny":
    print("rule-following: not measured (the 'Rule-following before training' cell did not run on this model)")

from alignkit.train.report import show

show(run_folder)  # in a notebook: training.png (loss, learning rate, the run's own curves) below this cell
