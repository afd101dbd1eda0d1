"""Training and its algorithms: what sft.py, dpo.py, kto.py, reward.py, rl.py and rlaif.py run.

- training: checks before any work, TRL configs, finish.
- run_folder: a run's folder: whether it resumes, claiming it; run_release: a run that ends badly keeps its
  checkpoints or gives the folder back to the earlier run; run_locks: one training
  at a time in it; named_files: the files its settings name beside the model and data, by content; cell_checks:
  a notebook's cells run out of order (each training the one its Run folder cell decided, on its Data cell's data).
- sampling: --group_by_length's batches of similar length.
- report: training.png and the closing summary of a run.
- trainers: alignkit's TRL trainers (stacked adapters, the explicit reference pass); resuming: what every trainer
  carries over a resume (the last step trains nothing more, TRL's token count goes on).
- loss_mask: sft.py's loss mask (--train_on, TRL's completion_only_loss and assistant_only_loss) and TRL's
  eos_token/pad_token (every script that takes them), checked against the rows and the chat template before the
  model loads.
- losses: preference losses TRL lacks (the DPO paper's sigmoid and IPO; SimPO and ORPO, reference-free).
- kto: kto.py's trainer (TRL's KTOTrainer with stacked adapters and alignkit's reference).
- prefix: DPO prefix sharing (a pair's prompt computed once); flex_check: whether FlexAttention's kernel trains
  it correctly on this GPU, before auto picks it.
- refcache: the reference log-prob cache.
- lota: Lottery Ticket Adaptation (sparse deltas instead of LoRA): the training glue; lota_mask: its calibration
  and mask (the delta itself: alignkit.modeling.lota_delta).
- reward: reward.py's losses and trainer.
- rl: rl.py's prompts and GRPO/RLOO trainers; rl_rewards: its rewards (rule, judge, reward model, code);
  kept_judgments: the judgments a judge reward paid for, kept when a run folder is given back.
- rlaif: rlaif.py's rounds; rlaif_inputs: what each round's scripts are given, and each step's inputs by content;
  step_process: each of a round's scripts in its own process, its output logged and shown live.
"""
