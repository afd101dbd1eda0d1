"""alignkit: align language models with LoRA/QLoRA adapters on top of Hugging Face TRL.

The package holds the logic; the top-level cell scripts (sft.py, dpo.py, kto.py, reward.py, rl.py, rlaif.py, label.py,
evaluate.py, merge.py) read like notebooks over it. Its modules, in one subpackage per pipeline stage:

- core (shared infrastructure):
  args (the one settings mechanism: flags, env, .env, --config, presets),
  config (every script's settings in one namespace), groups (the shared settings groups),
  train_settings and tool_settings (the training scripts' and the other scripts' settings),
  trl_names (TRL's and the alignment-handbook's names for the training settings),
  trl_tables (its tables: TRL's aliases, the keys not applied or refused, the names that mark TRL's style),
  trl_types (TRL's own field types: a flag's or a recipe's value as a TRL config field takes it),
  mixture (a run's training and held-out data: a share, a test split, a handbook dataset mixture),
  mixture_formats (the handbook's dataset_mixer and TRL's datasets as a dataset_mixture),
  errors (UserError and how a script reports it),
  extras (the optional eval and tracking extras, and the line that installs a missing one),
  paths (the cache folder, and folders built there once by one process),
  launch (the launch mode, this process's device and process group, the loader's hardware decisions, refusals),
  zero3 (DeepSpeed ZeRO-3's zero.Init registered before the weights load, set aside for a whole-model build),
  kernels (the attention implementation and Liger a load uses),
  threads (torch's CPU threads for a loaded model),
  parent_death (a launch's rank or rlaif's step stops when its parent is killed),
  journal (append-only logs, atomic writes, the concurrent map every crash-safe loop uses),
  digests (the one digest, SHA-256 of canonical JSON, every cache key is made of),
  code_digest (a user's Python code, a python: judge or reward, by its source and all the code it imports),
  sources (a Hub id or a local path, a Hub id at a revision written ID@REVISION, and whether the Hub answers),
  environment (the settings' environment layer: ALIGNKIT_<NAME>, and every other ALIGNKIT_ variable accounted for),
  data (the one data normaliser), row_checks (one row's messages, answers and pairs checked),
  message_columns (messages with tool calls stored as JSON),
  data_files (reading files, folders and Hub datasets into rows that keep their place),
  hub (Hub pushes),
  secrets (what is kept out of logs, configs, cards and wandb),
  saved_settings (settings as a run saves them, secrets as ***),
  card (model cards through huggingface_hub's ModelCard), run_records (a run's settings, a checkpoint's own figures),
  progress (the one progress-bar rule),
  llm (the chat-client factory for OpenAI-compatible endpoints).
- modeling (load, generate, merge models; the presets):
  models (the one loader), model_folders (a model source checked before it loads),
  reward_models (reward models told from causal LMs; the score-head base and the LM head beside it),
  template_rows (a row or prompt the chat template refuses, named in one line),
  chain (a model's adapter chain down to its base, a checkpoint's frozen adapters included),
  identity (the one identity of a model as loaded, which every cache of model outputs keys on),
  lineage (what a run trained over by content: an adapter over a part changed since is refused),
  gguf (GGUF files converted once),
  generation (local answering engines: transformers, vLLM),
  merge (adapters into their base),
  lota_delta (a LoTA sparse delta: its files, and how the loader adds it),
  experts (a mixture of experts' fused experts under LoRA and 4-bit: said, or refused before the load),
  presets (the offline `tiny` demo and its rule),
  smol (SmolLM2-135M).
- train (training and its algorithms):
  training (checks, TRL configs, finish), run_folder (a run's folder: resume, claim),
  run_release (a run that ends badly: its checkpoints kept, or the folder given back),
  run_locks (one training per folder), named_files (the other files settings name, by content),
  cell_checks (a notebook's cells run out of order), step_process (a script as a step of rlaif.py's rounds),
  sampling (--group_by_length's batches), report (training.png and the closing summary of a run),
  trainers (alignkit's TRL trainers), loss_mask (sft.py's loss mask and TRL's end tokens, checked before the
  model loads), resuming (what every trainer carries over a resume),
  losses (preference losses TRL lacks: the DPO paper's, SimPO, ORPO),
  kto (kto.py's trainer: TRL's KTOTrainer with alignkit's adapters and reference),
  prefix (DPO prefix sharing: a pair's prompt computed once), flex_check (FlexAttention checked on this GPU before
  auto picks it),
  refcache (reference log-prob cache),
  lota and lota_mask (Lottery Ticket Adaptation: training, and its calibration and mask),
  reward (reward.py's losses and trainer),
  rl (rl.py's prompts and GRPO/RLOO trainers), rl_rewards (its rewards: rule, judge, reward model, code),
  kept_judgments (the judgments a run paid for, kept when its folder goes),
  rlaif (rlaif.py's rounds), rlaif_inputs (what each round's scripts are given, and each step's inputs by content).
- feedback (AI feedback):
  judge (label.py's judges), judge_templates (their prompts),
  labeling, label_inputs, label_pairs and label_records (label.py's pipeline; its prompts and responses files read
  and checked; its pairs and judging; its cache and output),
  pointwise (label.py --mode pointwise: one grade per answer, KTO data),
  ratings (FastChat's single-answer grading prompt and rating parser),
  rewards (reward models as one callable; judge's RMJudge scores with it).
- evals (evaluation):
  evaluation (evaluate.py's commands, vibes and the pairwise flow),
  named_models (--models NAME=ID_OR_PATH[@REVISION]: the models mt_bench, pairwise and lm_eval compare),
  prompts_file (--prompts_file read as single-turn questions, each bad row named),
  mtbench, judgments, fastchat_compat and results (the pairwise flow's answers, verdicts, FastChat judging and
  statistics),
  alpacaeval (evaluate.py alpaca_eval), with alpacaeval_outputs, alpacaeval_annotate and alpacaeval_report,
  harness (evaluate.py lm_eval: EleutherAI's lm-evaluation-harness), with harness_report (its results.md, table
  and chart).

This module itself holds the `alignkit` logger every module imports (its filters keep secrets out of every line:
alignkit.core.secrets, imported when a line is logged; and under a launch, info lines to the main process), and
the filter that drops bitsandbytes' import-time kernel warning (installed before anything imports bitsandbytes);
the rest of the library noise is alignkit.core.progress.quiet_library_noise. It imports no alignkit module at
import time, so no module's import cycles back here.
"""
import logging
import warnings

__version__ = "0.1.0"

# tqdm.auto in a notebook kernel without ipywidgets (VS Code's and Jupyter's, unless installed) warns "IProgress not
# found. Please update jupyter and ipywidgets" when datasets or transformers first import it, then draws text bars,
# which work: the first cell of every notebook showed it. Widget bars: `pip install ipywidgets`.
warnings.filterwarnings("ignore", message="IProgress not found")

# One named logger for the whole toolkit, so users can silence or raise it in one place.
logger = logging.getLogger("alignkit")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[alignkit] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _Redact(logging.Filter):
    """Every alignkit log line without secrets: a key's value, a URL's password (alignkit.core.secrets)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from alignkit.core.secrets import redact

        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


if not any(isinstance(f, _Redact) for f in logger.filters):
    logger.addFilter(_Redact())


class _MainProcessInfo(logging.Filter):
    """Under a launch, info lines from the main process only (8 GPUs printed every decision 8 times); warnings and
    errors from every process, and a line logged with extra={"every_rank": True} (what each process itself did)."""

    def filter(self, record: logging.LogRecord) -> bool:
        import os

        return record.levelno > logging.INFO or getattr(record, "every_rank", False) or \
            os.environ.get("RANK", "0") == "0"


if not any(isinstance(f, _MainProcessInfo) for f in logger.filters):
    logger.addFilter(_MainProcessInfo())


class _DropLine(logging.Filter):
    """Drops a library's log record whose message holds `text`: a note with nothing for the user to act on."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg) and self.text not in record.getMessage()


# Installed before anything imports bitsandbytes or DeepSpeed: their notes are logged at import time.
# Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning. bitsandbytes logs it on
# import on any CPU with AVX512-BF16, and PEFT and transformers import bitsandbytes in every run, so it appeared in
# runs that hold no 4-bit weights at all. It says that the `kernels` package's faster kernel for bitsandbytes'
# repacked CPU layout is missing; alignkit keeps 4-bit weights out of that layout anyway
# (alignkit.modeling.models.keep_4bit_layout: the repacking changes the weights).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropLine("gemm_4bit_forward"))
# Drops the `kernels` package's "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'
# because Hugging Face Hub is in offline mode", logged when bitsandbytes looks for that same CPU kernel on import
# (transformers >= 5.25 installs `kernels`): the same note as above, in other words.
logging.getLogger("kernels._internals.hf_hub").addFilter(_DropLine("quantization-bitsandbytes"))
# Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
# logged at import wherever torch sees no GPU (transformers and accelerate import DeepSpeed in every run where it is
# installed, ZeRO or not): on a CPU machine it says nothing to act on, and alignkit's own launch line names the
# device. Only that line: every other DeepSpeed warning stays.
logging.getLogger("DeepSpeed").addFilter(_DropLine("Setting accelerator to CPU"))
# Drops transformers' "mtime may not be reliable on this filesystem, falling back to numerical ordering", logged when
# a run's checkpoints were all written within a second (any short run that saves often, the tiny preset's): it then
# orders them by step number, which is how alignkit orders them too (--resume auto).
logging.getLogger("transformers.trainer_utils").addFilter(_DropLine("mtime may not be reliable"))
# Drops the Trainer's "Multiple active adapters detected will only consider the first adapter", logged on every resume
# of a run stacked on earlier adapters: it reloads the trained adapter from the checkpoint, and alignkit turns the
# frozen ones back on after it (alignkit.train.trainers._StackedAdapters).
logging.getLogger("transformers.trainer").addFilter(_DropLine("Multiple active adapters detected will only consider"))
