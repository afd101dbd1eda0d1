"""Shared infrastructure: what every stage and every script stands on.

- args: the one settings mechanism (flags, env, .env, --config, presets).
- config: every script's settings dataclasses in one namespace, re-exported from:
  groups (the shared settings groups, composed by inheritance), train_settings (sft.py, dpo.py, reward.py, rl.py,
  rlaif.py) and tool_settings (label.py, evaluate.py, merge.py).
- trl_names: TRL's and the alignment-handbook's names for the training settings (aliases, pass-through).
- trl_tables: trl_names' tables (TRL's aliases, the keys not applied or refused, the names that mark TRL's style).
- trl_types: TRL's own field types: a flag's or a recipe's value as a TRL config field takes it, checked early.
- mixture: a run's training and held-out data (a share, a test split, a handbook dataset mixture).
- mixture_formats: the handbook's dataset_mixer and TRL's datasets as a dataset_mixture.
- errors: UserError and how a script reports it.
- extras: the optional eval and tracking extras, and the one line that installs a missing one.
- paths: the cache folder ($ALIGNKIT_CACHE).
- launch: the launch mode, this process's device and process group, the loader's hardware decisions, refusals.
- zero3: DeepSpeed ZeRO-3's zero.Init registered before the weights load, set aside for a whole-model build.
- kernels: the attention implementation and Liger a load uses.
- threads: torch's CPU threads for a loaded model (--num_threads).
- parent_death: a child process (a launch's rank, rlaif's step) stops when its parent is killed.
- journal: append-only logs, atomic writes, the concurrent map every crash-safe loop uses.
- digests: the one digest (SHA-256 of canonical JSON) every cache key and record is made of.
- code_digest: the identity of a user's Python code (a `python:` judge, reward or verifier) and all it imports.
- sources: a Hub id or a local path, a Hub id at a revision written ID@REVISION, and whether the Hub answers.
- environment: the settings' environment layer (ALIGNKIT_<NAME>; a variable no script reads is reported).
- progress: the one progress-bar rule (a bar in a terminal and a notebook, none in CI logs).
- data: the one data normaliser (SFT and preference rows from files, folders, the Hub).
- row_checks: the checks of one row's messages, answers and preference pairs (tool calls and reasoning kept).
- message_columns: how the normalised rows are stored (messages with tool calls or reasoning as JSON).
- data_files: reading a file, folder or Hub dataset into rows that keep their file and line.
- hub: Hub pushes.
- secrets: what is kept out of logs, error lines, saved configs, model cards and wandb.
- saved_settings: settings as a run saves them (alignkit_config.json, what a model was built under), secrets as ***.
- card: model cards through huggingface_hub's ModelCard (license, model-index, citations).
- run_records: a run's settings and a checkpoint's own figures, read back from its folder (a checkpoint-N's run
  settings are one folder up).
- llm: the chat-client factory for OpenAI-compatible endpoints.
"""
