"""The settings groups every script composes: the loader, the Hub push, the judge endpoint, training, LoTA,
batching and the generation engine (alignkit.core.config re-exports them with every script's settings).

A group is a dataclass of `setting(...)` fields with its own checks; a script's settings inherit the groups it
needs, so the same thing has the same flag, default and check everywhere.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from alignkit import logger
from alignkit.core.args import ConfigError, setting
from alignkit.core.errors import UserError
from alignkit.core.saved_settings import note_not_applied
from alignkit.core.sources import split_revision
from alignkit.core.trl_names import DTYPE_SYNONYMS


@dataclass
class ModelSettings:
    model_id: str = setting(
        "mistralai/Mistral-7B-Instruct-v0.2",
        "Hub id, local model folder, .gguf file, or adapter folder (its base model is read from adapter_config.json)",
    )
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of model_id")
    gguf_file: str | None = setting(
        None, "GGUF file NAME inside the model_id folder or Hub repo (a .gguf model_id needs none); converted once, cached"
    )
    trust_remote_code: bool = setting(False, "run custom model code shipped with the checkpoint; off unless asked")
    chat_template: str | None = setting(None, "Jinja chat template: a FILE, or the template itself (a recipe's "
                                              "inline one), for a model that lacks one or to replace its own")
    quantization: str = setting(
        "auto", "auto: 4bit for training on CUDA, none for inference and on a CPU; 4bit is NF4 with double quant (QLoRA)",
        choices=["auto", "4bit", "8bit", "none"],
    )
    bnb_4bit_quant_type: str = setting("nf4", "4-bit data type: nf4 (QLoRA's NormalFloat) or fp4", choices=["nf4", "fp4"])
    use_bnb_nested_quant: bool = setting(True, "4-bit double quantization: the block scales quantized too (QLoRA; "
                                               "about 0.4 bits per weight less)")
    dtype: str = setting(
        "auto", "compute dtype; auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 on older ones, fp32 on CPU",
        choices=["auto", "bf16", "fp16", "fp32"], synonyms=DTYPE_SYNONYMS,
    )
    attn_implementation: str = setting(
        "auto", "auto: flex_attention for dpo.py with prefix sharing on a GPU of compute capability >= 8.0 where the "
        "model runs under it and its kernel passes a check on that GPU; else flash_attention_2 when installed, on "
        "such a GPU, in bf16/fp16; else sdpa",
        choices=["auto", "flex_attention", "flash_attention_2", "sdpa", "eager"],
    )
    use_liger: str = setting(
        "auto", "Liger Triton kernels: auto uses them on CUDA when liger-kernel is installed",
        choices=["auto", "true", "false"],
    )
    num_threads: str = setting(
        "auto", "torch CPU threads; auto: OMP_NUM_THREADS when set, else 1 for a model under 50M parameters on a "
        "CPU, else the physical cores"
    )

    def __post_init__(self):
        _chain_post_init(self, ModelSettings)
        model, revision = split_revision(self.model_id)
        if revision is not None:  # the form of a second model (--models, --compare_to): here, two flags
            raise ConfigError(f"--model_id {self.model_id}: write --model_id {model} --revision {revision} (ID@REVISION "
                              "names the other models: --models, --compare_to, --reference_model, --model_a)")


_SAME = object()  # loader_settings: "the revision (or GGUF file) that goes with the model"


def loader_settings(s, model_id: str, revision=_SAME, **changes) -> ModelSettings:
    """The loader settings of another model, `model_id`, loaded the way `s` loads models (dtype, quantization,
    attention, ...): the one way every script builds them (a second generator, a judge, a reward model, a base).

    The revision and the GGUF file name belong to `s.model_id`: they carry over only when `model_id` is that
    same model (pass `revision` to set it). A model named ID@REVISION (evaluate.py --models, label.py --model_a,
    alignkit.core.sources.split_revision) loads at that revision. A GenerationSettings stays one, so the engine
    settings come along.
    """
    model_id, named = split_revision(model_id)
    if named is not None:
        if revision not in (_SAME, None, named):
            raise ConfigError(f"{model_id}@{named} names revision {named}, and revision {revision} is set too: "
                              "give the revision once")
        revision = named
    cls = GenerationSettings if isinstance(s, GenerationSettings) else ModelSettings
    values = {f.name: getattr(s, f.name) for f in fields(cls) if hasattr(s, f.name)}
    same = model_id == getattr(s, "model_id", None)
    values.update(model_id=model_id, gguf_file=values.get("gguf_file") if same else None,
                  revision=(values.get("revision") if same else None) if revision is _SAME else revision)
    return cls(**{**values, **changes})


def chat_template_text(value: str) -> str:
    """--chat_template's Jinja text: a file's contents, or the value itself when it is a template (a recipe's
    inline one, as the alignment-handbook writes them), checked to compile (as transformers compiles it). It sits
    beside the setting so that the loader (alignkit.modeling.models) and the identity of a model as loaded
    (alignkit.modeling.identity) read it one way; both do before the model loads, so a broken template is one line
    then, not a traceback from inside TRL's dataset map."""
    if "{{" in value or "{%" in value:
        return _compiles(value, "--chat_template (the template given inline)")
    if not Path(value).is_file():
        raise UserError(f"--chat_template {value}: file not found; pass a Jinja chat template file or the template "
                        "itself")
    try:
        text = Path(value).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--chat_template {value}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save the file as UTF-8") from None
    return _compiles(text, f"--chat_template {value}")


def _compiles(text: str, where: str) -> str:
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template  # its extensions ({% generation %})

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        raise UserError(f"{where}: line {e.lineno}: not a valid Jinja template ({e.message}); fix the template") \
            from None
    return text


def check_seed(seed: int) -> None:
    """A seed numpy takes (transformers.set_seed and datasets' shuffles draw on it): 0 to 2**32 - 1."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {seed}")


def check_limits(settings, *names: str) -> None:
    """Limits where none means all (--max_prompts): 0 is refused, not taken as "no limit" as `if limit:` took it."""
    for name in names:
        if (limit := getattr(settings, name)) is not None and limit < 1:
            raise ConfigError(f"--{name} must be at least 1 (or none: all), got {limit}")


def _chain_post_init(self, cls) -> None:
    """Run the next __post_init__ in the MRO after `cls`'s: groups used by composition check in turn."""
    parent = getattr(super(cls, self), "__post_init__", None)
    if parent:
        parent()


@dataclass
class HubPushSettings:
    """Pushing the result to the Hugging Face Hub: one group (training runs, label.py, merge.py). The repo and its
    namespace are settled at the push (alignkit.core.hub), as TRL settles them."""

    push_to_hub: bool = setting(False, "push the result (model, adapter or label.py's dataset) to the Hugging Face "
                                       "Hub (needs HF_TOKEN)")
    hub_repo_id: str | None = setting(None, "Hub repo to push to, e.g. you/mistral-7b-dpo; a bare name, or none (the "
                                            "run's name, as TRL does), is created in your account")
    hub_public: bool = setting(False, "make the Hub repo public (private by default)")

    def __post_init__(self):
        _chain_post_init(self, HubPushSettings)


@dataclass
class JudgeEndpointSettings:
    """An LLM judge at an OpenAI-compatible endpoint: one group for label.py, rl.py and evaluate.py's judges.

    Defaults reconciled (they differed between scripts): max_retries 5, as label.py had (evaluate.py had 3);
    judge_max_tokens 2048, FastChat's MT-Bench value (label.py had 1024; it is a ceiling, not a length).
    """

    judge_model: str | None = setting(None, "judge model name at the endpoint")
    judge_base_url: str | None = setting(
        None, "OpenAI-compatible judge endpoint, e.g. http://localhost:8000/v1; default: OPENAI_BASE_URL, else OpenAI"
    )
    judge_api_key_env: str = setting("OPENAI_API_KEY", "NAME of the variable holding the judge's API key")
    parallel: int = setting(8, "concurrent requests to the judge (and to label.py's generator endpoints)")
    max_retries: int = setting(5, "retries of a request on 429, 5xx, timeouts (the client's exponential backoff, "
                                  "Retry-After); a timeout before the endpoint's first answer stops the run")
    request_timeout: float = setting(120.0, "seconds before one request attempt times out")

    def __post_init__(self):
        _chain_post_init(self, JudgeEndpointSettings)
        self.check_judge()

    def check_judge(self):
        if self.parallel < 1 or self.max_retries < 0 or self.request_timeout <= 0:
            raise ConfigError("parallel must be >= 1, max_retries >= 0 and request_timeout > 0")
        if (self.judge_model or "").startswith("rm:"):  # was taken for a name at the endpoint: "OPENAI_API_KEY..."
            raise ConfigError(f"--judge_model {self.judge_model}: --judge_model names an LLM judge (evaluate.py "
                              "pairwise also takes rule or python:module:function); a reward model judges through "
                              "--judge rm:FOLDER (label.py, rlaif.py) and rewards through --reward rm:FOLDER (rl.py)")


@dataclass
class JudgeAnswerSettings(JudgeEndpointSettings):
    """How the judge answers, for the judges that alignkit prompts itself (not alpaca_eval's annotators)."""

    judge_temperature: float = setting(0.0, "judge sampling temperature")
    judge_max_tokens: int = setting(2048, "longest judge answer, in tokens (FastChat's value; self_reference needs "
                                          "room for its own answer)")

    def check_judge(self):
        super().check_judge()
        if self.judge_max_tokens < 1 or self.judge_temperature < 0:
            raise ConfigError(f"judge_max_tokens must be >= 1 and judge_temperature >= 0, got "
                              f"{self.judge_max_tokens} and {self.judge_temperature}")


# --help shows a training script's settings in these groups, most used first (alignkit.core.args).
TRAIN_HELP_GROUPS = [
    ("model", ["preset", "model_id", "quantization", "dtype", "attn_implementation", "revision", "chat_template",
               "gguf_file", "trust_remote_code", "use_liger", "num_threads", "bnb_4bit_quant_type",
               "use_bnb_nested_quant"]),
    ("data", ["dataset_id", "dataset_config", "dataset_split", "dataset_test_split", "eval_split", "max_samples",
              "dataset_format", "dataset_text_field", "dataset_mixture", "skip_invalid"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora",
              "lora_modules_to_save", "adapter"]),
    ("training", ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_length", "lr_scheduler_type", "warmup_ratio", "weight_decay",
                  "max_grad_norm", "gradient_checkpointing", "seed", "group_by_length",
                  "per_device_eval_batch_size", "trainer_overrides"]),
    ("run folder, logging and checkpoints", ["output_dir", "run_name", "resume", "report_to", "wandb_project",
                                             "logging_steps", "eval_steps", "save_steps", "save_total_limit"]),
    ("Hub and merging", ["push_to_hub", "hub_repo_id", "hub_public", "merge_adaptors"]),
    ("LoTA (--adapter lota)", ["lota_sparsity", "lota_calibration_steps", "lota_mask_scope", "lota_mask",
                               "lota_exclude_mask", "lota_target_modules"]),
]


@dataclass
class TrainSettings(HubPushSettings, ModelSettings):
    """What every training script shares. TRL's names for these are accepted too (alignkit.core.trl_names)."""

    trl_configs: ClassVar[tuple[str, ...]] = ("SFTConfig",)  # the TRL config(s) whose fields pass through
    # Whether the script evaluates on a dataset's own test split: TRL's dataset_name then means --dataset_test_split
    # auto where evaluation is asked for (alignkit.core.trl_names.Vocabulary.finish); reward.py and rl.py read one.
    reads_test_split: ClassVar[bool] = True
    takes_mixture: ClassVar[bool] = True  # reward.py, rl.py, rlaif.py read one split (a mixture refused)
    holds_out: ClassVar[bool] = True  # rl.py holds no data out at all: it refuses evaluation in its own words
    help_groups: ClassVar[list] = TRAIN_HELP_GROUPS
    help_rest_at: ClassVar[int] = 4  # the script's own settings (DPO, reward, ...) right after training
    # The script's notebook cells (their `## ` headings, in order; notebooks/build.py makes them from its `# %%` cells,
    # tests/test_notebooks.py checks them) by what each does: a notebook's refusals name the cells to run again
    # (alignkit.train.cell_checks). "data", "model" and any of `not_read_by`'s cells are run again only where a
    # setting they read changed; "settings" and "save" never; every other one (the run folder, training) always.
    notebook_cells: ClassVar[dict[str, str]] = {
        "settings": "Settings", "data": "Data", "run folder": "Run folder", "model": "Model", "train": "Train",
        "save": "Save, evaluate, merge, push"}
    # Settings that a cell's work does not read, by the cell, beyond those alignkit.train.cell_checks knows every
    # script's "data" and "model" cells leave alone: changed, what the cell built stands (rl.py's rewards). Any other
    # change needs the cell again; a setting not known to be left alone is read.
    not_read_by: ClassVar[dict[str, frozenset[str]]] = {}

    @classmethod
    def vocabulary(cls):
        from alignkit.core.trl_names import Vocabulary

        return Vocabulary(cls)

    preset: str | None = setting(None, "named defaults; any flag still overrides them")
    # Data
    dataset_id: str = setting(
        "argilla/ultrafeedback-binarized-preferences-cleaned",
        "Hub dataset id or local .json/.jsonl/.parquet/.csv file or folder",
    )
    dataset_config: str | None = setting(None, "Hub dataset configuration name")
    dataset_split: str = setting("train", "split to train on")
    dataset_format: str = setting("auto", "row format; auto detects it from the columns (see alignkit.core.data)")
    skip_invalid: bool = setting(False, "skip rows that fail validation (and report how many) instead of stopping")
    max_samples: int | None = setting(None, "use at most this many rows (after shuffling with seed) to train, and to evaluate "
                                        "where the held-out rows are a split of their own (or a mixture's test rows, "
                                        "test_split_size's too); for quick runs")
    eval_split: float = setting(0.05, "held-out share of the data (< 1), or a whole number of rows; 0 disables eval")
    dataset_test_split: str | None = setting(
        None, "held-out data: this split of the dataset (e.g. test_prefs) instead of a share of the training split; "
        "auto: its test split where it has one (TRL's, for dataset_name with evaluation), else the --eval_split share")
    dataset_mixture: dict[str, Any] | None = setting(
        None, "alignment-handbook mixture: {datasets: [{id, config, split, columns, weight}], seed, test_split_size}; "
        "replaces --dataset_id (alignkit.core.mixture)")
    # Run folder
    output_dir: str = setting("runs", "parent folder; a run writes to output_dir/run_name (a --config recipe's "
                                      "output_dir, without run_name, is the run folder itself, as in TRL)")
    run_name: str | None = setting(None, "run folder name; default: <stage>-<model>-<dataset>")
    resume: str = setting(
        "auto", "auto: continue from the run's last checkpoint when its settings match; true: must resume; false: start over",
        choices=["auto", "true", "false"],
    )
    # Optimisation
    num_train_epochs: float = setting(1.0, "passes over the training data (max_steps wins when set)")
    max_steps: int = setting(-1, "stop after this many optimizer steps; -1: use num_train_epochs")
    learning_rate: float = setting(5e-5, "peak learning rate (AdamW)")
    per_device_train_batch_size: int = setting(4, "examples (or preference pairs) per device per step")
    per_device_eval_batch_size: int = setting(8, "examples per device per eval step")
    gradient_accumulation_steps: int = setting(4, "micro-batches accumulated into one optimizer step")
    max_length: int | None = setting(1024, "longest tokenized sequence (prompt + answer); longer ones are truncated; "
                                           "none: no truncation (TRL's None)")
    warmup_ratio: float = setting(0.1, "share of steps for the linear learning-rate warm-up")
    lr_scheduler_type: str = setting("cosine", "learning-rate schedule (transformers SchedulerType)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    gradient_checkpointing: str = setting(
        "auto", "recompute activations in backward (less memory, ~20% slower); auto: off when the activations of "
        "a micro-batch fit in half the free memory, else on (logged)", choices=["auto", "true", "false"],
    )
    seed: int = setting(42, "seed for data shuffling, adapter init and sampling")
    # LoRA
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input (kept in DPO, KTO and reward models, where "
                                        "TRL turns the model's own dropout off)")
    use_rslora: bool = setting(False, "rank-stabilised LoRA: scale by alpha / sqrt(r)")
    use_dora: bool = setting(False, "DoRA: weight-decomposed LoRA (slower; not with 4-bit on every PEFT version)")
    lora_modules_to_save: list[str] | None = setting(
        None, "modules trained in full and saved with the adapter, e.g. lm_head,embed_tokens")
    lora_target_modules: list[str] = setting(
        default_factory=lambda: ["all-linear"], help="modules that get adapters; all-linear: every linear layer but the LM head"
    )
    # Logging and checkpoints
    # Each of the three: a number of steps, or (below 1) a share of the run's steps, as transformers reads it.
    logging_steps: float = setting(10, "log loss and rewards every N steps")
    eval_steps: float | None = setting(None, "evaluate every N steps; default: at the end only")
    save_steps: float = setting(100, "write a checkpoint every N steps (a rerun resumes from the last one)")
    save_total_limit: int | None = setting(2, "keep at most this many checkpoints; none: every one (TRL's default)")
    report_to: list[str] = setting(
        default_factory=lambda: ["auto"], help="trackers, comma separated; auto: wandb when WANDB_API_KEY or "
        "wandb_project is set, else none; all: wandb and tensorboard, where installed", choices=["auto", "none", "all", "wandb", "tensorboard"],
    )
    wandb_project: str | None = setting(None, "Weights & Biases project (also read from WANDB_PROJECT by wandb)")
    # After training
    merge_adaptors: bool = setting(False, "also write a merged, standalone model to <run>/merged")
    trainer_overrides: dict[str, Any] = setting(
        {}, "further TRL config fields as a JSON object, e.g. '{\"optim\": \"paged_adamw_8bit\"}'; each one is a "
        "flag under its TRL name too (--optim paged_adamw_8bit)"
    )

    def __post_init__(self):
        super().__post_init__()
        # NaN too; 1.5 is neither a share nor a row count (it was held out as 1 row without a word)
        if not 0 <= self.eval_split < math.inf or self.eval_split >= 1 and self.eval_split != int(self.eval_split):
            raise ValueError(f"--eval_split must be a share below 1, a whole number of rows, or 0 (none held out); "
                             f"got {self.eval_split}")
        check_seed(self.seed)
        from alignkit.core.trl_tables import refusal  # a flag's refusal holds inside --trainer_overrides too

        overrides = self.trainer_overrides if isinstance(self.trainer_overrides, dict) else {}
        if any(isinstance(v, str) for v in overrides.values()):  # JSON's "false" as TRL takes it, as a flag's is
            from alignkit.core.trl_types import typed_overrides

            self.trainer_overrides = overrides = typed_overrides(overrides, type(self).trl_configs)
        if "output_dir" in overrides:  # the run folder is where alignkit resumes, keeps and saves a run
            raise ValueError("--trainer_overrides output_dir: the run goes to --output_dir/--run_name (alignkit's run "
                             "folder, where it resumes and saves); pass --output_dir (and --run_name) instead")
        if refused := sorted(n for n, v in overrides.items() if refusal(n, v, type(self).trl_configs)):
            raise ValueError(f"--trainer_overrides {refused[0]} has no effect in alignkit: "
                             f"{refusal(refused[0], overrides[refused[0]], type(self).trl_configs)}; drop it")
        check_limits(self, "max_samples")
        # Values TRL would take silently (a negative learning rate ascends the loss) or fail on after the model loads.
        for name, low, high, what in (("learning_rate", 0, math.inf, ">= 0"), ("weight_decay", 0, math.inf, ">= 0"),
                                      ("max_grad_norm", 0, math.inf, ">= 0 (0: no clipping)"),
                                      ("warmup_ratio", 0, 1, "a share of the steps, from 0 to 1"),
                                      ("num_train_epochs", -math.inf, math.inf, "a number")):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"--{name} must be {what}, got {getattr(self, name)}")
        alpha = overrides.get("neftune_noise_alpha")  # TrainingArguments' field: a negative one failed mid-training
        if isinstance(alpha, (int, float)) and not alpha >= 0:
            raise ValueError(f"--neftune_noise_alpha must be >= 0 (NEFTune's noise scale, 5 in its paper; none: off), "
                             f"got {alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be from 0 up to (not including) 1, got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError("--lora_target_modules is empty: pass all-linear, or module names such as q_proj,v_proj")
        # Counts the Trainer would take silently (max_steps -5 trains by epochs) or fail on deep in a library.
        counts = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                  "max_length", "lora_r")
        for name in counts:
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: rl.py has no max_length
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("logging_steps", "save_steps") + (("eval_steps",) if self.eval_steps is not None else ()):
            steps = getattr(self, name)
            if not (0 < steps < 1 or (steps >= 1 and float(steps).is_integer())):
                raise ValueError(f"--{name} must be a whole number of steps (at least 1) or a share of the run's "
                                 f"steps between 0 and 1, got {steps}")
            setattr(self, name, steps if steps < 1 else int(steps))
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be a number of steps (>= 1), or -1 to train for --num_train_epochs; "
                             f"got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(f"--num_train_epochs must be above 0 (or set --max_steps), got {self.num_train_epochs}")
        if self.dataset_mixture is not None:
            from alignkit.core.mixture import check_beside_mixture, check_mixture

            check_mixture(self.dataset_mixture)
            if type(self).takes_mixture:  # the others refuse the mixture itself, in one line
                check_beside_mixture(self)
        strategy = str(getattr(overrides.get("eval_strategy"), "value", overrides.get("eval_strategy"))).lower()
        if self.eval_steps and type(self).holds_out and strategy == "no":  # TRL ignores eval_steps under "no"
            logger.info(f"eval_steps {self.eval_steps} not used: eval_strategy no evaluates nothing during training "
                        "(TRL ignores it too)")
        elif (self.eval_steps or strategy not in ("none", "no")) and type(self).holds_out and not self.has_eval_data():
            advice, asked = self.test_split_advice(), f"eval_steps {self.eval_steps}" if self.eval_steps else ""
            raise ValueError(f"{asked or f'eval_strategy {strategy}'} but no held-out data (eval_split 0, no "
                             "dataset_test_split or test split in the mixture): nothing would be evaluated. Pass "
                             f"--eval_split 0.05{f' or {advice}' if advice else ''}, or "
                             f"{'eval_strategy no' if strategy != 'none' else 'drop eval_steps'}")

    def test_split_advice(self) -> str | None:
        """How to name held-out rows of their own: a mixture's test entry, else --dataset_test_split; None where
        the script takes neither (rlaif.py: an --eval_split share of each round's pairs)."""
        if self.dataset_mixture and type(self).takes_mixture:
            return "an entry with test: true (or test_split_size) in the dataset_mixture"
        return "--dataset_test_split test" if type(self).reads_test_split else None

    def has_eval_data(self) -> bool:
        """Whether the run holds data out: a share, a test split, or a mixture's test part."""
        mixture = self.dataset_mixture or {}
        return bool(self.eval_split > 0 or (self.dataset_test_split and not mixture) or mixture.get("test_split_size")
                    or any(d.get("test") for d in mixture.get("datasets", [])))


@dataclass
class LoTASettings:
    """The adapter kind, and LoTA's settings (alignkit.train.lota): shared by every script that trains an adapter."""

    adapter: str = setting(
        "lora", "lora: a LoRA adapter; lota: a sparse delta found by Lottery Ticket Adaptation (alignkit.train.lota)",
        choices=["lora", "lota"],
    )
    lota_sparsity: float = setting(0.9, "LoTA: share of each targeted matrix that stays frozen, in (0, 1)")
    lota_calibration_steps: int = setting(100, "LoTA: dense fine-tuning steps (same data and loss) that find the mask")
    lota_mask_scope: str = setting(
        "matrix", "LoTA: keep the largest |delta| per matrix, or over all targeted matrices together",
        choices=["matrix", "global"],
    )
    lota_mask: str | None = setting(None, "LoTA: reuse this mask (lota_mask.safetensors or a LoTA run folder); no calibration")
    lota_exclude_mask: str | None = setting(
        None, "LoTA: never train these entries (an earlier task's mask or run folder): sequential tasks stay disjoint"
    )
    lota_target_modules: list[str] = setting(
        default_factory=lambda: ["all-linear"], help="LoTA: linear layers that get a delta; all-linear: all but the LM head"
    )

    def __post_init__(self):
        _chain_post_init(self, LoTASettings)
        if self.adapter != "lota":
            return
        if not 0.0 < self.lota_sparsity < 1.0:
            raise ValueError(f"lota_sparsity must lie strictly between 0 and 1 (the share kept frozen), got {self.lota_sparsity}")
        if getattr(self, "quantization", "none") in ("4bit", "8bit"):
            raise ValueError(f"--adapter lota needs full-precision weights (the delta is added to them), not "
                             f"--quantization {self.quantization}: pass --quantization none (or auto)")
        if getattr(self, "push_to_hub", False) and not getattr(self, "merge_adaptors", False):
            raise ValueError("--push_to_hub with --adapter lota pushes the merged model: add --merge_adaptors (a "
                             "sparse delta loads only with alignkit)")
        if not self.lota_mask and self.lota_calibration_steps < 1:
            raise ValueError("lota_calibration_steps must be >= 1 unless --lota_mask gives the mask")
        defaults = {f.name: f.default for f in fields(self) if f.name.startswith(("lora_", "use_rslora", "use_dora"))}
        if unused := {name: getattr(self, name) for name, default in defaults.items()
                      if getattr(self, name) != default and name not in ("lora_target_modules", "lora_dropout")}:
            # LoRA's settings set beside --adapter lota trained the same delta silently
            note_not_applied(self, unused, f"{', '.join('--' + n for n in unused)} not applied: --adapter lota "
                             "trains a sparse delta, not LoRA (its own settings are --lota_*)")


@dataclass
class BatchingSettings:
    """How training rows are put into batches: shared by sft.py and dpo.py."""

    group_by_length: bool = setting(
        True, "batches of rows of similar length (less padding), in random order, the same on every process"
    )


@dataclass
class TemplateArgumentsSettings:
    """The chat template's arguments for every prompt a script generates from (label.py, evaluate.py, rl.py, and
    rlaif.py, which passes them to its label.py and evaluate.py steps)."""

    chat_template_kwargs: dict[str, Any] = setting(
        {}, "extra arguments of the chat template as a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3, "
        "SmolLM3), as GRPOConfig and vLLM name them; a prompt row's own chat_template_kwargs and tools columns go "
        "on top"
    )


@dataclass
class GenerationSettings(TemplateArgumentsSettings, ModelSettings):
    """The loader settings, and the engine that answers with a local model (label.py, evaluate.py)."""

    backend: str = setting(
        "auto", "local generation engine; auto: vllm when installed and a CUDA GPU is there, else transformers",
        choices=["auto", "vllm", "transformers"],
    )
    max_model_len: int = setting(
        8192, "vLLM: longest prompt + answer in tokens (capped at the model's context); sizes the KV cache, so a "
        "128k-context model fits a small GPU"
    )
    gpu_memory_utilization: float | None = setting(
        None, "vLLM: share of the GPU's memory one engine may take; default: 90% of what is free when it starts, "
        "so a second engine (generator B, a judge) fits beside the first"
    )
