"""Every script's settings: typed dataclasses with a default and a one-line help each.

The groups are shared by inheritance, so sft.py and dpo.py (and later scripts) expose the same flag for the
same thing. `alignkit.core.args.parse_config` turns a class into flags and environment variables (`--dpo_beta` is
`DPO_BETA`), reads `.env`, `--config recipe.yaml` and the `--preset`; `python sft.py --help` lists them all.

Defaults are for a real GPU run and follow the seed project (Mistral-7B-Instruct-v0.2, UltraFeedback, QLoRA
NF4 with bf16 compute, LoRA on all linear layers, flash attention 2 when installed, beta 0.1). "auto" settings
are resolved at load time from the hardware, with one log line each (see alignkit.modeling.models).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from alignkit.core.args import ConfigError, setting


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
    chat_template: str | None = setting(None, "Jinja chat template FILE, for a model that lacks one")
    quantization: str = setting(
        "auto", "auto: 4bit for training on CUDA, none for inference and on a CPU; 4bit is NF4 with double quant (QLoRA)",
        choices=["auto", "4bit", "8bit", "none"],
    )
    dtype: str = setting(
        "auto", "compute dtype; auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 on older ones, fp32 on CPU",
        choices=["auto", "bf16", "fp16", "fp32"],
    )
    attn_implementation: str = setting(
        "auto", "auto: flash_attention_2 when installed, on a GPU of compute capability >= 8.0, in bf16/fp16; else sdpa",
        choices=["auto", "flash_attention_2", "sdpa", "eager"],
    )
    use_liger: str = setting(
        "auto", "Liger Triton kernels: auto uses them on CUDA when liger-kernel is installed",
        choices=["auto", "true", "false"],
    )
    num_threads: str = setting(
        "auto", "torch CPU threads; auto: OMP_NUM_THREADS when set, else 1 for a model under 50M parameters on a "
        "CPU, else the physical cores"
    )


_SAME = object()  # loader_settings: "the revision (or GGUF file) that goes with the model"


def loader_settings(s, model_id: str, revision=_SAME, **changes) -> ModelSettings:
    """The loader settings of another model, `model_id`, loaded the way `s` loads models (dtype, quantization,
    attention, ...): the one way every script builds them (a second generator, a judge, a reward model, a base).

    The revision and the GGUF file name belong to `s.model_id`: they carry over only when `model_id` is that
    same model (pass `revision` to set it). A GenerationSettings stays one, so the engine settings come along.
    """
    cls = GenerationSettings if isinstance(s, GenerationSettings) else ModelSettings
    values = {f.name: getattr(s, f.name) for f in fields(cls) if hasattr(s, f.name)}
    same = model_id == getattr(s, "model_id", None)
    values.update(model_id=model_id, gguf_file=values.get("gguf_file") if same else None,
                  revision=(values.get("revision") if same else None) if revision is _SAME else revision)
    return cls(**{**values, **changes})


def _chain_post_init(self, cls) -> None:
    """Run the next __post_init__ in the MRO after `cls`'s: groups used by composition check in turn."""
    parent = getattr(super(cls, self), "__post_init__", None)
    if parent:
        parent()


@dataclass
class HubPushSettings:
    """Pushing the result to the Hugging Face Hub: one group with one check (training runs, label.py, merge.py)."""

    push_to_hub: bool = setting(False, "push the result (model, adapter or label.py's dataset) to the Hugging Face "
                                       "Hub (needs HF_TOKEN)")
    hub_repo_id: str | None = setting(None, "Hub repo to push to, e.g. you/mistral-7b-dpo")
    hub_public: bool = setting(False, "make the Hub repo public (private by default)")

    def __post_init__(self):
        _chain_post_init(self, HubPushSettings)
        if self.push_to_hub and not self.hub_repo_id:
            raise ConfigError("push_to_hub needs hub_repo_id: pass --hub_repo_id you/name")


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
                                  "Retry-After)")
    request_timeout: float = setting(120.0, "seconds before one request attempt times out")

    def __post_init__(self):
        _chain_post_init(self, JudgeEndpointSettings)
        self.check_judge()

    def check_judge(self):
        if self.parallel < 1 or self.max_retries < 0 or self.request_timeout <= 0:
            raise ConfigError("parallel must be >= 1, max_retries >= 0 and request_timeout > 0")


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


@dataclass
class TrainSettings(HubPushSettings, ModelSettings):
    preset: str | None = setting(
        None, "named defaults: 'tiny' is the offline CPU demo, 'smol' SmolLM2-135M; any flag still overrides it"
    )
    # Data
    dataset_id: str = setting(
        "argilla/ultrafeedback-binarized-preferences-cleaned",
        "Hub dataset id or local .json/.jsonl/.parquet/.csv file or folder",
    )
    dataset_config: str | None = setting(None, "Hub dataset configuration name")
    dataset_split: str = setting("train", "split to train on")
    dataset_format: str = setting("auto", "row format; auto detects it from the columns (see alignkit.core.data)")
    skip_invalid: bool = setting(False, "skip rows that fail validation (and report how many) instead of stopping")
    max_samples: int | None = setting(None, "use at most this many rows (after shuffling with seed); for quick runs")
    eval_split: float = setting(0.05, "held-out share of the data (< 1), or a row count (>= 1); 0 disables eval")
    # Run folder
    output_dir: str = setting("runs", "parent folder; a run writes to output_dir/run_name")
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
    max_length: int = setting(1024, "longest tokenized sequence (prompt + answer); longer ones are truncated")
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
    lora_dropout: float = setting(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = setting(
        default_factory=lambda: ["all-linear"], help="modules that get adapters; all-linear: every linear layer but the LM head"
    )
    # Logging and checkpoints
    logging_steps: int = setting(10, "log loss and rewards every N steps")
    eval_steps: int | None = setting(None, "evaluate every N steps; default: at the end only")
    save_steps: int = setting(100, "write a checkpoint every N steps (a rerun resumes from the last one)")
    save_total_limit: int = setting(2, "keep at most this many checkpoints")
    report_to: str = setting(
        "auto", "auto: wandb when WANDB_API_KEY or wandb_project is set, else none",
        choices=["auto", "none", "wandb", "tensorboard"],
    )
    wandb_project: str | None = setting(None, "Weights & Biases project (also read from WANDB_PROJECT by wandb)")
    # After training
    merge_adaptors: bool = setting(False, "also write a merged, standalone model to <run>/merged")
    trainer_overrides: str | None = setting(
        None, "JSON object of extra TRL/transformers training arguments, e.g. '{\"optim\": \"paged_adamw_8bit\"}'"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.eval_split < 0:
            raise ValueError(f"eval_split must be >= 0, got {self.eval_split}")


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
        parent = getattr(super(), "__post_init__", None)
        if parent:
            parent()
        if self.adapter != "lota":
            return
        if not 0.0 < self.lota_sparsity < 1.0:
            raise ValueError(f"lota_sparsity must lie strictly between 0 and 1 (the share kept frozen), got {self.lota_sparsity}")
        if getattr(self, "quantization", "none") in ("4bit", "8bit"):
            raise ValueError(
                f"--adapter lota needs full-precision weights (the delta is added to them), not --quantization "
                f"{self.quantization}: pass --quantization none (or auto)"
            )
        if getattr(self, "push_to_hub", False) and not getattr(self, "merge_adaptors", False):
            raise ValueError(
                "--push_to_hub with --adapter lota pushes the merged model: add --merge_adaptors (a sparse delta "
                "loads only with alignkit)"
            )
        if not self.lota_mask and self.lota_calibration_steps < 1:
            raise ValueError("lota_calibration_steps must be >= 1 unless --lota_mask gives the mask")


@dataclass
class BatchingSettings:
    """How training rows are put into batches: shared by sft.py and dpo.py."""

    group_by_length: bool = setting(
        True, "batches of rows of similar length (less padding), in random order, the same on every process"
    )


@dataclass
class SFTSettings(LoTASettings, BatchingSettings, TrainSettings):
    run_type: ClassVar[str] = "sft"  # recorded in alignkit_config.json (not a flag)
    dataset_id: str = setting(
        "HuggingFaceH4/ultrachat_200k", "Hub dataset id or local .json/.jsonl/.parquet/.csv file or folder"
    )
    dataset_split: str = setting("train_sft", "split to train on")
    learning_rate: float = setting(2e-4, "peak learning rate (AdamW); LoRA SFT takes a larger one than DPO")
    train_on: str = setting(
        "auto", "auto: loss on completions or assistant turns where the data allows; all: on every token",
        choices=["auto", "completions", "all"],
    )
    packing: bool = setting(False, "pack several examples into each sequence")


@dataclass
class DPOSettings(LoTASettings, BatchingSettings, TrainSettings):
    run_type: ClassVar[str] = "dpo"
    dpo_beta: float = setting(0.1, "beta: strength of the pull towards the reference (IPO: its tau)")
    loss_type: list[str] = setting(
        default_factory=lambda: ["sigmoid"],
        help="TRL DPO loss(es), comma separated (sigmoid, ipo, hinge, robust, ...); sigmoid and ipo follow the DPO paper's code; "
        "simpo and orpo (alone) need no reference model",
    )
    simpo_gamma: float = setting(0.5, "SimPO's target reward margin gamma (--loss_type simpo; TRL's CPOConfig name)")
    cpo_alpha: float = setting(0.0, "weight of an NLL term on the chosen answers under --loss_type simpo (CPO; TRL's name)")
    loss_weights: list[float] | None = setting(None, "weights for a comma list of loss types, e.g. 0.8,0.2")
    label_smoothing: float = setting(
        0.0, "conservative DPO (cDPO): assumed share of flipped labels, in [0, 0.5); read by sigmoid, TRL's robust, exo_pair, aot"
    )
    precompute_ref_log_probs: bool = setting(False, "compute reference log-probs up front; identical reruns reuse them")
    reference_adapters: int | None = setting(
        None, "how many of the adapters the model was loaded with, from the base up, the reference keeps on; "
        "default: all (the model you start from); 0: the bare base")
    prefix_sharing: bool = setting(
        True, "compute each pair's prompt once (chosen and rejected in one row, block attention mask); off by itself "
        "with flash_attention_2 or a mixture-of-experts model"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dpo_beta <= 0:
            raise ValueError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        # the loss module owns the bounds and which losses read it
        from alignkit.train.losses import check_label_smoothing, check_loss_types, is_reference_free

        check_label_smoothing(self.label_smoothing, self.loss_type)  # e.g. ipo would silently drop it
        check_loss_types(self.loss_type)  # simpo and orpo run alone
        for name, default in (("simpo_gamma", 0.5), ("cpo_alpha", 0.0)):
            if getattr(self, name) != default and self.loss_type != ["simpo"]:
                raise ConfigError(f"--{name} applies to --loss_type simpo only, not {','.join(self.loss_type)}; drop it")
        for name, unset in (("precompute_ref_log_probs", False), ("reference_adapters", None)):
            if is_reference_free(self.loss_type) and getattr(self, name) is not unset:
                raise ConfigError(f"--{name} has no effect with --loss_type {self.loss_type[0]}: it reads no "
                                  "reference model; drop it")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types {self.loss_type}"
            )


@dataclass
class RewardSettings(TrainSettings):
    """reward.py: a reward model (one-output score head + LoRA) trained on preference pairs."""

    run_type: ClassVar[str] = "reward"

    learning_rate: float = setting(1e-5, "peak learning rate (AdamW)")
    loss: str = setting(
        "bradley_terry", "bradley_terry: -log sigmoid(r_c - r_r), TRL's; logexp: log(1 + exp(r_r - r_c)), "
        "OpenRLHF's; logexpwithlm: logexp with a margin plus --lm_loss_coef x the chosen answer's LM loss",
        choices=["bradley_terry", "logexp", "logexpwithlm"],
    )
    center_rewards_coefficient: float | None = setting(
        None, "add coef x mean((r_c + r_r)^2), pulling rewards towards 0 (TRL's; e.g. 0.01)"
    )
    use_margin: bool = setting(
        False, "subtract each pair's margin: a 'margin' column, else the difference of its chosen/rejected scores"
    )
    lm_loss_coef: float = setting(1e-6, "logexpwithlm: weight of the chosen sequence's LM cross-entropy (0: none)")

    def __post_init__(self):
        super().__post_init__()
        if self.lm_loss_coef < 0:
            raise ValueError(f"lm_loss_coef must be >= 0, got {self.lm_loss_coef}")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


@dataclass
class GenerationSettings(ModelSettings):
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


@dataclass
class LabelSettings(JudgeAnswerSettings, HubPushSettings, GenerationSettings):
    """label.py. The loader settings above apply to every local generator."""

    model_id: str = setting(
        "mistralai/Mistral-7B-Instruct-v0.2", "the model --num_samples samples from, and the --mode completions "
        "teacher unless --model_a is set: Hub id, local or adapter folder, or openai:MODEL",
    )
    preset: str | None = setting(
        None, "named defaults: 'tiny' or 'smol' (SmolLM2-135M) labels its own prompts with its rule judge"
    )
    mode: str = setting(
        "pairs", "pairs: judged response pairs, preference data for dpo.py; completions: a teacher's answers, "
        "SFT data for sft.py; pointwise: each answer graded alone against --grade_threshold, KTO data for kto.py",
        choices=["pairs", "completions", "pointwise"],
    )
    grade_threshold: float | None = setting(
        None, "--mode pointwise: an answer is desirable when its grade reaches this; default: 7 for an LLM's 1-10 "
        "rating, 0 for a reward model's score, 1 for a python grader (True counts 1)")
    # Prompts
    prompts: str | None = setting(
        None, "prompts: .jsonl/.json/.csv/.parquet file or Hub dataset id; default: the prompts of --responses_a"
    )
    prompt_field: str = setting("prompt", "column holding the prompt: text, or role/content messages")
    prompts_split: str = setting("train", "split of a Hub prompt dataset")
    prompts_config: str | None = setting(None, "configuration name of a Hub prompt dataset")
    max_prompts: int | None = setting(None, "use only the first N distinct prompts")
    # Where the responses come from
    model_a: str | None = setting(
        None, "generator A: Hub id, local or adapter folder, or openai:MODEL for an OpenAI-compatible endpoint"
    )
    model_b: str | None = setting(None, "generator B, like --model_a")
    responses_a: str | None = setting(None, "existing responses for slot A (instead of --model_a): a file with "
                                            "the prompt column and a response column")
    responses_b: str | None = setting(None, "existing responses for slot B (instead of --model_b)")
    response_field: str = setting("auto", "response column of those files; auto: response, completion, output or answer")
    num_samples: int = setting(0, "N >= 2: sample N responses per prompt from --model_id and judge every pair of them")
    max_new_tokens: int = setting(512, "longest generated response, in tokens")
    temperature: float = setting(0.7, "generation temperature; 0 is greedy")
    top_p: float = setting(1.0, "nucleus sampling for generation")
    generation_batch_size: int = setting(16, "prompts per batch for local generation (and for --judge hf)")
    generation_base_url: str | None = setting(
        None, "endpoint of openai:MODEL generators; default: OPENAI_BASE_URL, else the OpenAI API"
    )
    generation_api_key_env: str = setting("OPENAI_API_KEY", "NAME of the variable holding the generators' API key")
    # Judge
    judge: str = setting("openai", "openai: OpenAI-compatible endpoint; hf: local transformers model; "
                                   "rm:RUN_FOLDER: a reward.py model scores each answer; "
                                   "python:module:function (or python:file.py:function): a rule or verifier")
    judge_model: str | None = setting(
        None, "endpoint model name (default gpt-4o-mini), or for --judge hf a Hub id or folder"
    )
    judge_template: str = setting(
        "default", "default, self_reference, or a FastChat judge_prompts.jsonl FILE (FILE#NAME picks one entry)"
    )
    principle: str = setting(
        "Which response is more helpful, honest and harmless?", "the one principle of --judge_template self_reference"
    )
    judge_revision: str | None = setting(None, "Hub revision (branch, tag or commit) of a --judge hf model")
    rm_tie_margin: float = setting(0.0, "--judge rm:RUN_FOLDER: a reward difference of at most this is a tie")
    retry_parse_failures: bool = setting(
        False, "ask the judge again for cached answers without a verdict (otherwise a rerun keeps them, paid once)")
    both_orders: bool = setting(True, "judge every pair in both orders and label it only when they agree")
    # Output
    output: str | None = setting(None, "output .jsonl; default: runs/label-<prompts>/<preferences|completions>.jsonl")
    cache_dir: str | None = setting(None, "cache of responses and judgments a rerun resumes from; default: OUTPUT.cache")
    seed: int = setting(42, "seed for sampling")

    def __post_init__(self):
        super().__post_init__()  # the judge endpoint's and the Hub push's checks
        if self.num_samples == 1 or self.num_samples < 0:
            raise ValueError(f"num_samples must be 0 (off) or >= 2, got {self.num_samples}")
        for name in ("generation_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.rm_tie_margin < 0:
            raise ValueError(f"rm_tie_margin must be >= 0, got {self.rm_tie_margin}")


# ---------------------------------------------------------------- evaluate.py
from dataclasses import field as _field  # noqa: E402  (init=False: a field that is not a flag)


@dataclass
class EvalSettings(GenerationSettings):
    """What every evaluate.py command shares: the loader settings above, and how the models answer."""

    max_new_tokens: int = setting(1024, "longest answer per turn, in tokens (FastChat's MT-Bench default)")
    temperature: float | None = setting(
        None, "sampling temperature, 0 is greedy; none: FastChat's per-category MT-Bench temperatures (0.7 else)"
    )
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest token set with this much probability")
    num_beams: int = setting(1, "beam search width (1: none)")
    batch_size: int = setting(8, "prompts per generation batch")
    seed: int = setting(42, "sampling seed")

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, num_beams and batch_size must be >= 1")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class VibesSettings(EvalSettings):
    """evaluate.py vibes: a quick look at one model's answers, or two side by side."""

    preset: str | None = setting(
        None, "named defaults: 'tiny' or 'smol' (SmolLM2-135M) asks that model its own prompts"
    )
    compare_to: str | None = setting(None, "second model (Hub id, folder, adapter or merged folder) shown beside the first")
    prompts: list[str] = setting([], "prompts to ask, each one quoted: --prompts \"Hi!\" \"Name three fruits.\"",
                                 whole=True)
    prompts_file: str | None = setting(None, "JSONL of {\"prompt\": ...} rows, or a .txt file with one prompt a line")
    system_prompt: str | None = setting(None, "system message put before every prompt")
    max_new_tokens: int = setting(256, "longest answer, in tokens")
    temperature: float = setting(0.7, "sampling temperature; 0 is greedy")
    output_file: str | None = setting(None, "JSONL written with every answer; default: outputs/vibes-<time>.jsonl")


@dataclass
class MTBenchSettings(JudgeAnswerSettings, EvalSettings):
    """evaluate.py mt_bench: answers to MT-Bench, judged pairwise by an OpenAI-compatible model through FastChat."""

    model_id: str = _field(default="", init=False)  # the models come from --models; the loader settings apply to each
    revision: str | None = _field(default=None, init=False)
    models: list[str] = setting([], "models to compare, as NAME=ID_OR_PATH (Hub id, local, adapter or merged folder)")
    mode: str = setting(
        "pairwise-baseline", "pairwise-baseline: every model against --baseline; pairwise-all: every pair",
        choices=["pairwise-baseline", "pairwise-all"],
    )
    baseline: str | None = setting(None, "NAME of the baseline model; default: the first of --models")
    judge_model: str | None = setting(None, "judge model name at the endpoint, e.g. gpt-4o (required)")
    retry_parse_failures: bool = setting(
        False, "judge again the matches whose recorded verdict could not be parsed (otherwise a rerun keeps them)")
    parallel: int = setting(1, "concurrent requests to the judge (FastChat's default: one at a time)")
    mt_bench_data: str | None = setting(
        None, "FastChat's data folder (judge_prompts.jsonl, mt_bench/...); default: download once into the cache"
    )
    question_ids: list[int] = setting([], "judge only these question ids (MT-Bench: 81-160)")
    max_questions: int | None = setting(None, "judge only the first N questions; for quick runs")
    bootstrap_rounds: int = setting(1000, "bootstrap resamples (of questions) for the 95% confidence intervals")
    output_dir: str = setting("outputs/mt_bench", "answers, judgments and results go here; a rerun resumes from them")

    def __post_init__(self):
        super().__post_init__()  # the judge endpoint's checks, then the generation settings'
        if self.bootstrap_rounds < 1:
            raise ValueError(f"bootstrap_rounds must be >= 1, got {self.bootstrap_rounds}")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError(f"max_questions must be >= 1, got {self.max_questions}")
        if not self.models:
            raise ValueError("pass the models to compare: --models NAME=ID_OR_PATH NAME=ID_OR_PATH ...")
        if not self.judge_model:
            raise ValueError("pass the judge: --judge_model NAME (a model served by an OpenAI-compatible endpoint)")


@dataclass
class PairwiseSettings(MTBenchSettings):
    """evaluate.py pairwise: MT-Bench's pairwise flow on your own single-turn prompts."""

    preset: str | None = setting(
        None, "named defaults: 'tiny' compares the demo's SFT and DPO runs, 'smol' SmolLM2 and its DPO run, by their rule"
    )
    prompts_file: str | None = setting(
        None, "JSONL of {\"prompt\": ..., optional \"category\", \"question_id\"} rows, or a .txt file, a prompt a line"
    )
    judge_model: str | None = setting(
        None, "judge model name at the endpoint (FastChat's pair-v2 prompt), or 'rule': the --preset's rule judge "
        "(tiny's if none)"
    )
    output_dir: str = setting("outputs/pairwise", "answers, judgments and results go here; a rerun resumes from them")

    def __post_init__(self):
        super().__post_init__()
        if not self.prompts_file:
            raise ValueError("pass the prompts: --prompts_file FILE (or --preset tiny for the demo's own)")


@dataclass
class AlpacaEvalSettings(JudgeEndpointSettings, EvalSettings):
    """evaluate.py alpaca_eval: AlpacaEval win rates against reference outputs, judged by alpaca_eval itself."""

    preset: str | None = setting(None, "named defaults: 'tiny' runs the whole flow offline with the rule judge")
    judge_model: str | None = setting(
        None, "judge model name at the endpoint; default: the annotator config's own (e.g. gpt-4-1106-preview)"
    )
    model_name: str | None = setting(None, "the generator's name in outputs and leaderboard; default: model folder name")
    eval_set: str | None = setting(
        None, "JSON/JSONL rows with an `instruction` field; default: AlpacaEval's 805 (Hub tatsu-lab/alpaca_eval)"
    )
    max_instances: int | None = setting(None, "evaluate only the first N instructions; for quick runs")
    reference_outputs: str | None = setting(
        None, "reference outputs in AlpacaEval's format (instruction, output, generator); default: AlpacaEval 2's "
        "GPT-4 Turbo outputs with the default eval set"
    )
    reference_model: str | None = setting(
        None, "generate the reference outputs with this model (e.g. the base); --reference_outputs wins over it"
    )
    reference_name: str | None = setting(None, "the reference's generator name; default: its folder name")
    annotators_config: str = setting(
        "weighted_alpaca_eval_gpt4_turbo", "alpaca_eval annotator config: a name of its evaluators_configs "
        "(alpaca_eval_gpt4, ...) or a configs.yaml path; --judge_model rule: the tiny preset's rule judge",
    )
    lc_glm: str = setting(
        "auto", "length-controlled GLM; auto: length_controlled_v1 on AlpacaEval's set, length_controlled_minimal "
        "(no instruction difficulty) on your own", choices=["auto", "length_controlled_v1", "length_controlled_minimal"],
    )
    lc_data: str | None = setting(
        None, "AlpacaEval's df_gamed.csv (instruction difficulties) for length_controlled_v1; default: the Hub file"
    )
    temperature: float = setting(0.7, "sampling temperature of the generated outputs; 0 is greedy")
    output_dir: str = setting("outputs/alpaca_eval", "outputs, annotations, leaderboard and summary; reruns resume")

    def __post_init__(self):
        super().__post_init__()  # the judge endpoint's checks, then the generation settings'
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {self.max_instances}")


@dataclass
class MergeSettings(HubPushSettings):
    """merge.py: adapters merged into their base, checked, saved, and optionally pushed."""

    preset: str | None = setting(None, "named defaults: 'tiny' merges runs/tiny-dpo, 'smol' runs/smol-dpo")
    adapter_dir: str | None = setting(None, "adapter folder (a training run); chains (SFT then DPO) merge in order")
    base_model: str | None = setting(None, "base model to merge into; default: the one the adapter records")
    add_delta: str | None = setting(
        None, "LoTA task merge: a second delta folder; adapter_dir's delta + this one go to output_dir as one delta"
    )
    output_dir: str | None = setting(None, "where the merged model goes; default: <adapter_dir>/merged")
    dtype: str = setting("auto", "weights of the merged model; auto: bf16 on CUDA, fp32 on CPU",
                         choices=["auto", "bf16", "fp16", "fp32"])
    dequantize: bool = setting(
        False, "merge into the NF4-quantized base, dequantized: the exact model a QLoRA adapter was trained on"
    )
    max_shard_size: str = setting("5GB", "largest safetensors shard")
    trust_remote_code: bool = setting(False, "run custom model code shipped with the checkpoint; off unless asked")
    push: str = setting("merged", "what to push: the merged model, or the adapter alone", choices=["merged", "adapter"])

    def __post_init__(self):
        if not self.adapter_dir:
            raise ValueError("pass the adapter to merge: --adapter_dir RUN_FOLDER (or --preset tiny)")
        super().__post_init__()


# ---------------------------------------------------------------- rl.py
@dataclass
class RLSettings(JudgeAnswerSettings, TrainSettings, GenerationSettings):
    """rl.py: online GRPO/RLOO on a LoRA policy, rewarded by a rule, a judge, a reward model or a function.

    The prompts come from --dataset_id (a file or Hub dataset of prompts, read as label.py reads --prompts).
    The judge settings are label.py's group (JudgeAnswerSettings), so the judgment cache keys are built alike.
    """

    run_type: ClassVar[str] = "rl"

    dataset_id: str = setting("HuggingFaceH4/ultrafeedback_binarized", "prompts: .jsonl/.json/.csv/.parquet file "
                                                                       "or Hub dataset id (read like label.py --prompts)")
    dataset_split: str = setting("train_prefs", "split of a Hub prompt dataset")
    prompt_field: str = setting("prompt", "column holding the prompt: text, or role/content messages")
    max_prompts: int | None = setting(None, "use only the first N distinct prompts")
    eval_split: float = setting(0.0, "unused by rl.py (it measures the reward on its own samples); keep 0")
    learning_rate: float = setting(1e-5, "peak learning rate (AdamW)")
    algo: str = setting("grpo", "grpo: group-normalised advantages (TRL GRPOTrainer); rloo: leave-one-out "
                                "baseline (TRL RLOOTrainer)", choices=["grpo", "rloo"])
    reward: list[str] = setting(
        default_factory=lambda: ["rule"], help="reward(s), comma separated: rule (the preset's), judge, "
        "rm:FOLDER (a reward.py run), python:module:function (or python:file.py:function)")
    reward_weights: list[float] | None = setting(None, "weights of a comma list of rewards, e.g. 1.0,0.5")
    beta: float = setting(0.04, "KL coefficient towards the reference (the policy with the trained adapter off)")
    num_generations: int = setting(8, "completions sampled per prompt (the group its advantages compare within)")
    max_completion_length: int = setting(256, "longest sampled completion, in tokens")
    temperature: float = setting(1.0, "sampling temperature of the rollouts")
    vllm_mode: str = setting("colocate", "--backend vllm: colocate (vLLM shares the training GPU) or server "
                                         "(trl vllm-serve on other GPUs)", choices=["colocate", "server"])
    vllm_gpu_memory_utilization: float = setting(0.3, "--backend vllm colocate: share of GPU memory vLLM may take")
    # The judge (--reward judge)
    judge_mode: str = setting("pointwise", "pointwise: FastChat's single-answer grading, [[rating]] 1-10 scaled to "
                                           "[0, 1]; pairwise: against --reference_completions, [[A]]/[[B]]/[[C]] is "
                                           "0/1/0.5", choices=["pointwise", "pairwise"])
    judge_model: str | None = setting(None, "judge model name at the OpenAI-compatible endpoint (default gpt-4o-mini)")
    judge_template: str = setting(
        "default", "pointwise: default (FastChat single-v1) or a judge_prompts.jsonl FILE#NAME of type single; "
        "pairwise: as label.py's --judge_template")
    principle: str = setting("Which response is more helpful, honest and harmless?",
                             "the one principle of --judge_template self_reference (pairwise)")
    reference_completions: str | None = setting(
        None, "pairwise judging: a file of prompt + response rows, the reference each completion is judged against")
    response_field: str = setting("auto", "response column of --reference_completions; auto: response, completion, "
                                          "output or answer")
    judge_cache: str | None = setting(None, "judgment cache folder (label.py's format); default: <run>/judge.cache")

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare completions of one prompt), got "
                             f"{self.num_generations}")
        if self.beta < 0 or self.max_completion_length < 1:
            raise ValueError("beta must be >= 0 and max_completion_length >= 1")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward)} rewards "
                             f"{self.reward}")
        if "judge" in self.reward and self.judge_mode == "pairwise" and not self.reference_completions:
            raise ValueError("--judge_mode pairwise needs --reference_completions FILE (prompt + response rows)")


# ---------------------------------------------------------------- rlaif.py
@dataclass
class RLAIFSettings(JudgeEndpointSettings, DPOSettings):
    """rlaif.py: rounds of sample (label.py) -> judge (label.py) -> DPO (dpo.py) -> evaluate (evaluate.py pairwise).

    The DPO settings apply to every round's dpo.py run; the judge endpoint group goes to both label.py and
    evaluate.py; label.py and evaluate.py get the settings below, and anything else through --label_args /
    --evaluate_args.
    """

    dataset_id: str = setting("HuggingFaceH4/ultrafeedback_binarized", "prompts: .jsonl/.json/.csv/.parquet file "
                                                                       "or Hub dataset id (label.py --prompts)")
    rounds: int = setting(3, "rounds of sample, judge, train, evaluate")
    num_samples: int = setting(4, "answers sampled per prompt from the current policy (every pair is judged)")
    max_prompts: int | None = setting(None, "use only the first N distinct prompts")
    sample_temperature: float = setting(0.7, "sampling temperature of the policy's answers")
    max_new_tokens: int = setting(512, "longest sampled answer, in tokens")
    reference: str = setting(
        "previous", "DPO reference of each round: previous: the previous round's policy (its adapters frozen under "
        "the new one); start: the model the first round started from", choices=["previous", "start"])
    judge: str = setting("openai", "label.py --judge: openai, hf, rm:RUN_FOLDER or python:module:function")
    eval_judge_model: str | None = setting(None, "evaluate.py pairwise --judge_model (rule: the tiny preset's rule); "
                                                 "default: --judge_model")
    eval_prompts: str | None = setting(None, "evaluate.py --prompts_file; default: the preset's, else --dataset_id")
    label_args: str = setting("", "further label.py flags for every round, e.g. '--parallel 16 --both_orders false'")
    evaluate_args: str = setting("", "further evaluate.py pairwise flags for every round")

    def __post_init__(self):
        super().__post_init__()
        if self.rounds < 1 or self.num_samples < 2:
            raise ValueError(f"rounds must be >= 1 and num_samples >= 2, got {self.rounds} and {self.num_samples}")
        from alignkit.train.losses import is_reference_free

        if self.reference == "start" and is_reference_free(self.loss_type):
            raise ConfigError(f"--reference start has no effect with --loss_type {self.loss_type[0]}: it reads no "
                              "reference model; drop it")


# ---------------------------------------------------------------- kto.py
@dataclass
class KTOSettings(TrainSettings):
    """kto.py: KTO on unpaired, labelled answers (alignkit.train.kto); TRL's KTOConfig names."""

    run_type: ClassVar[str] = "kto"
    dataset_id: str = setting(
        "trl-lib/kto-mix-14k", "labelled answers (prompt, completion, label) or preference pairs (each becomes a "
        "desirable and an undesirable row): Hub id or local file")
    beta: float = setting(0.1, "KTO's beta: strength of the pull towards the reference")
    desirable_weight: float = setting(1.0, "weight of the desirable answers' loss (raise it when they are fewer)")
    undesirable_weight: float = setting(1.0, "weight of the undesirable answers' loss")
    loss_type: str = setting("kto", "kto (with the KL baseline) or apo_zero_unpaired", choices=["kto", "apo_zero_unpaired"])
    precompute_ref_log_probs: bool = setting(False, "compute reference log-probs up front")
    reference_adapters: int | None = setting(
        None, "how many of the adapters the model was loaded with, from the base up, the reference keeps on; "
        "default: all (the model you start from); 0: the bare base")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError(f"beta, desirable_weight and undesirable_weight must be > 0, got {self.beta}, "
                              f"{self.desirable_weight} and {self.undesirable_weight}")
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ConfigError("--loss_type kto estimates its KL baseline from mismatched answers in a batch: pass "
                              "--per_device_train_batch_size 2 or more (or --loss_type apo_zero_unpaired)")


@dataclass
class LMEvalSettings(ModelSettings):
    """evaluate.py lm_eval: EleutherAI's lm-evaluation-harness on a base model and its tuned versions (the alignment
    tax), its own tasks and metrics (alignkit.evals.harness). The loader settings apply to every model; lm_eval's
    tasks carry their own prompts and generation settings, so none of evaluate.py's generation flags apply."""

    model_id: str = _field(default="", init=False)  # the models come from --models; the loader settings apply to each
    revision: str | None = _field(default=None, init=False)
    backend: str = _field(default="transformers", init=False)  # lm_eval runs its HF class on the loaded model
    num_beams: int = _field(default=1, init=False)
    preset: str | None = setting(None, "named defaults: 'tiny' runs the base model and the tiny runs on a local task")
    models: list[str] = setting([], "models side by side, as NAME=ID_OR_PATH (Hub id, local, adapter or merged folder, .gguf)")
    tasks: list[str] = setting([], "lm_eval task names as lm_eval lists them, e.g. ifeval gsm8k mmlu hellaswag")
    include_path: str | None = setting(None, "folder of extra lm_eval task YAML configs (e.g. a task over local files)")
    num_fewshot: int | None = setting(None, "few-shot examples per prompt; default: each task's own")
    limit: float | None = setting(None, "at most N examples per task (a share when < 1); for quick runs, not for reporting")
    apply_chat_template: bool = setting(True, "wrap each prompt in the model's chat template (tuned chat models expect it)")
    batch_size: int = setting(8, "lm_eval's batch size")
    seed: int = setting(42, "lm_eval's seeds (sampling, few-shot selection)")
    output_dir: str = setting("outputs/lm_eval", "results.md, results.json, results.png and each model's kept results")

    def __post_init__(self):
        _chain_post_init(self, LMEvalSettings)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.models:
            raise ConfigError("pass the models: --models NAME=ID_OR_PATH ... (e.g. base=org/model dpo=runs/dpo-run)")
        if not self.tasks:
            raise ConfigError("pass the tasks: --tasks NAME ... (lm_eval's names, e.g. ifeval gsm8k mmlu)")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit must be > 0, got {self.limit}")
