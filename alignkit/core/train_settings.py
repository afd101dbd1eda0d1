"""The training scripts' settings: sft.py, dpo.py, reward.py, rl.py and rlaif.py, each composed of the shared
groups of alignkit.core.groups (re-exported by alignkit.core.config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from alignkit.core.args import ConfigError, setting
from alignkit.core.environment import SETTING_SOURCES
from alignkit.core.groups import (
    BatchingSettings,
    GenerationSettings,
    JudgeAnswerSettings,
    JudgeEndpointSettings,
    LoTASettings,
    TRAIN_HELP_GROUPS,
    TemplateArgumentsSettings,
    TrainSettings,
    check_limits,
)
from alignkit.core.saved_settings import note_not_applied


@dataclass
class SFTSettings(LoTASettings, BatchingSettings, TrainSettings):
    run_type: ClassVar[str] = "sft"  # recorded in alignkit_config.json (not a flag)
    help_title: ClassVar[str] = "SFT"
    dataset_id: str = setting(
        "HuggingFaceH4/ultrachat_200k", "Hub dataset id or local .json/.jsonl/.parquet/.csv file or folder"
    )
    dataset_split: str = setting("train_sft", "split to train on")
    dataset_text_field: str = setting("text", "the column that holds each row's plain text (the text format)")
    learning_rate: float = setting(2e-4, "peak learning rate (AdamW); LoRA SFT takes a larger one than DPO")
    train_on: str = setting(
        "auto", "auto: loss on completions or assistant turns where the data allows; all: on every token",
        choices=["auto", "completions", "all"],
    )
    packing: bool = setting(False, "pack several examples into each sequence (of --max_length tokens)")

    def __post_init__(self):
        super().__post_init__()
        if self.packing and self.max_length is None:  # TRL's packer raises this once the model has loaded
            raise ValueError("--packing true packs examples into rows of --max_length tokens: give --max_length a "
                             "number, or pass --packing false to keep every example whole")
        overrides = self.trainer_overrides if isinstance(self.trainer_overrides, dict) else {}
        if overrides.get("padding_free") is True and not overrides.get("packing", self.packing) and \
                overrides.get("max_length", self.max_length) is not None:  # TRL's refusal, once the model has loaded
            raise ValueError("--padding_free true without --packing: TRL cannot cut rows to --max_length then, and "
                             "refuses; add --packing true (rows packed to --max_length tokens), or pass --max_length "
                             "none (every row kept whole)")


@dataclass
class DPOSettings(LoTASettings, BatchingSettings, TrainSettings):
    run_type: ClassVar[str] = "dpo"
    trl_configs: ClassVar[tuple[str, ...]] = ("DPOConfig",)
    help_title: ClassVar[str] = "DPO"
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
        0.0, "conservative DPO (cDPO): assumed share of flipped labels, in [0, 0.5); read by sigmoid, simpo, TRL's robust, exo_pair, aot, aot_unpaired"
    )
    precompute_ref_log_probs: bool = setting(False, "compute reference log-probs up front; identical reruns reuse them")
    reference_adapters: int | None = setting(
        None, "how many of the adapters the model was loaded with, from the base up, the reference keeps on; "
        "default: all (the model you start from); 0: the bare base (refused over a LoTA delta, which the "
        "weights hold)")
    prefix_sharing: bool = setting(
        True, "compute each pair's prompt once (chosen and rejected in one row, block attention mask); off by itself "
        "with flash_attention_2 or a mixture-of-experts model"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dpo_beta <= 0:
            raise ValueError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        # the loss module owns the bounds and which losses read it
        from alignkit.train.losses import (check_label_smoothing, check_loss_types, check_trl_refusals, check_weighting,
                                           is_reference_free)

        check_label_smoothing(self.label_smoothing, self.loss_type)  # e.g. ipo would silently drop it
        check_loss_types(self.loss_type)  # simpo and orpo run alone
        overrides = self.trainer_overrides if isinstance(self.trainer_overrides, dict) else {}
        effective = overrides.get("loss_type", self.loss_type)  # a --trainer_overrides TRL name wins (trl_config)
        effective = [effective] if isinstance(effective, str) else list(effective)
        check_weighting(overrides.get("use_weighting") is True, effective)  # before the model loads
        check_trl_refusals(effective, overrides.get("label_smoothing", self.label_smoothing), overrides)
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
        weights = overrides.get("loss_weights", self.loss_weights)
        if isinstance(weights, list) and weights and not any(weights):  # loss 0, gradient 0: nothing learned
            raise ConfigError(f"--loss_weights {','.join(map(str, weights))}: every weight is 0, so the loss "
                              "and its gradient are 0 and nothing trains; give a loss type a weight above 0")
        if overrides.get("precompute_ref_batch_size") is not None and not overrides.get(
                "precompute_ref_log_probs", self.precompute_ref_log_probs):
            note_not_applied(self, {"precompute_ref_batch_size": overrides["precompute_ref_batch_size"]},
                             "--precompute_ref_batch_size not applied: it sizes the up-front reference pass of "
                             "--precompute_ref_log_probs true")


@dataclass
class RewardSettings(TrainSettings):
    """reward.py: a reward model (one-output score head + LoRA) trained on preference pairs."""

    run_type: ClassVar[str] = "reward"
    takes_mixture: ClassVar[bool] = False  # refused in one line (__post_init__)
    trl_configs: ClassVar[tuple[str, ...]] = ("RewardConfig",)
    help_title: ClassVar[str] = "reward model"
    # --help's text where reward.py does otherwise than the shared field says (the field stays in groups.py).
    help_texts: ClassVar[dict[str, str]] = {
        "max_length": "longest tokenized sequence (prompt + answer); TRL's RewardTrainer drops a longer pair (the run "
                      "says how many) and the held-out report leaves it out; none: no limit (TRL's None)",
    }

    learning_rate: float = setting(1e-5, "peak learning rate (AdamW)")
    loss: str = setting(
        "bradley_terry", "bradley_terry: -log sigmoid(r_c - r_r), TRL's; logexp: log(1 + exp(r_r - r_c)), "
        "OpenRLHF's; logexpwithlm: logexp with a margin plus --lm_loss_coef x the chosen answer's LM loss",
        choices=["bradley_terry", "logexp", "logexpwithlm"],
    )
    center_rewards_coefficient: float | None = setting(
        None, "add coef x mean((r_c + r_r)^2), pulling rewards towards 0 (TRL's; e.g. 0.01)"
    )
    use_margin: str = setting(
        "auto", "subtract each pair's margin. auto: a 'margin' column where the data has one (TRL's RewardTrainer "
                "reads it); true: that column, else the difference of its chosen/rejected scores; false: none",
        choices=["auto", "true", "false"],
    )
    lm_loss_coef: float = setting(1e-6, "logexpwithlm: weight of the chosen sequence's LM cross-entropy (0: none)")

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_mixture:  # each split's margins are read from its own rows (alignkit.train.reward)
            raise ValueError("reward.py reads --dataset_id's split (and --dataset_test_split's, or an --eval_split "
                             "share): drop dataset_mixture, or write its rows to one dataset")
        if self.lm_loss_coef < 0:
            raise ValueError(f"lm_loss_coef must be >= 0, got {self.lm_loss_coef}")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


# ---------------------------------------------------------------- rl.py
_GROUPS = {name: frozenset(keys) for name, keys in TRAIN_HELP_GROUPS}
# rl.py's rollouts: read by its Train cell's TRL config only.
_ROLLOUTS = frozenset({"algo", "beta", "num_generations", "max_completion_length", "temperature", "vllm_mode",
                       "vllm_gpu_memory_utilization"})
# Its rewards' specs, weights and judge: read by its Rewards cell (alignkit.train.rl_rewards.build_rewards) and the
# Train cell's config (the weights), not by the Prompts or Model cells.
_REWARDS = frozenset({"reward", "reward_weights", "judge_mode", "judge_model", "judge_base_url", "judge_api_key_env",
                      "parallel", "max_retries", "request_timeout", "judge_temperature", "judge_max_tokens",
                      "judge_template", "principle", "reference_completions", "response_field", "judge_cache"})


@dataclass
class RLSettings(JudgeAnswerSettings, TrainSettings, GenerationSettings):
    """rl.py: online GRPO/RLOO on a LoRA policy, rewarded by a rule, a judge, a reward model or a function.

    The prompts come from --dataset_id (a file or Hub dataset of prompts, read as label.py reads --prompts).
    The judge settings are label.py's group (JudgeAnswerSettings), so the judgment cache keys are built alike.
    """

    run_type: ClassVar[str] = "rl"
    reads_test_split: ClassVar[bool] = False  # one split (refused: dataset_test_split)
    takes_mixture: ClassVar[bool] = False  # refused in one line (__post_init__)
    holds_out: ClassVar[bool] = False  # eval_steps too is refused in rl.py's words, not "pass --eval_split"
    # The shared fields it refuses (__post_init__): their help says so, not what they do in sft.py and dpo.py.
    help_texts: ClassVar[dict[str, str]] = {
        "dataset_test_split": "refused by rl.py: it measures the reward on its own samples, and holds no data out",
        "dataset_mixture": "refused by rl.py: it reads its prompts from --dataset_id",
        "eval_steps": "refused by rl.py: it holds no data out; the reward on its own samples is logged every "
                      "--logging_steps"}
    trl_configs: ClassVar[tuple[str, ...]] = ("GRPOConfig", "RLOOConfig")
    help_title: ClassVar[str] = "RL: algorithm, rewards, rollouts, judge"
    notebook_cells: ClassVar[dict[str, str]] = {
        "settings": "Settings", "data": "Prompts", "run folder": "Run folder", "rewards": "Rewards", "model": "Model",
        "train": "Train", "save": "Save, merge, push"}
    # The rewards are built from the reward specs, the judge's settings, the model loader's (rm:FOLDER), the run
    # folder (the judgments' default cache), the prompts (checked against them) and trainer_overrides (a reward
    # model's chat_template_kwargs): another beta, learning rate or LoRA rank leaves them standing.
    not_read_by: ClassVar[dict[str, frozenset[str]]] = {
        "data": (_ROLLOUTS - {"num_generations"}) | _REWARDS,
        "model": _ROLLOUTS | _REWARDS | {"prompt_field", "max_prompts"},
        "rewards": (_GROUPS["training"] - {"seed", "max_length", "trainer_overrides"}) | _GROUPS["LoRA"]
        | _GROUPS["LoTA (--adapter lota)"] | _GROUPS["Hub and merging"] | _ROLLOUTS
        | (_GROUPS["run folder, logging and checkpoints"] - {"output_dir", "run_name"}),
    }
    # The Prompts cell checks the prompts fill a generation batch (alignkit.train.rl.check_enough_prompts).
    read_by: ClassVar[dict[str, frozenset[str]]] = {
        "data": frozenset({"num_generations", "per_device_train_batch_size", "gradient_accumulation_steps"})}

    dataset_id: str = setting("HuggingFaceH4/ultrafeedback_binarized", "prompts: .jsonl/.json/.csv/.parquet file "
                                                                       "or Hub dataset id (read like label.py --prompts)")
    dataset_split: str = setting("train_prefs", "split of a Hub prompt dataset")
    prompt_field: str = setting("prompt", "column holding the prompt: text, or role/content messages")
    max_prompts: int | None = setting(None, "use only the first N rows (every row trains, repeats included)")
    eval_split: float = setting(0.0, "unused by rl.py (it measures the reward on its own samples); keep 0")
    max_length: int | None = setting(None, "unused by rl.py: TRL's GRPO/RLOO keep each prompt whole and stop the "
                                           "answers at --max_completion_length")
    learning_rate: float = setting(1e-5, "peak learning rate (AdamW)")
    algo: str = setting("grpo", "grpo: group-normalised advantages (TRL GRPOTrainer); rloo: leave-one-out "
                                "baseline (TRL RLOOTrainer)", choices=["grpo", "rloo"])
    reward: list[str] = setting(
        default_factory=list, help="reward(s), comma separated (required): rule (the tiny preset's word check), "
        "judge, rm:FOLDER (a reward.py run), python:module:function (or python:file.py:function)")
    reward_weights: list[float] | None = setting(None, "weights of a comma list of rewards, e.g. 1.0,0.5")
    beta: float = setting(0.04, "KL coefficient towards the reference (the policy with the trained adapter off); "
                                "for both algos (TRL's own defaults: GRPO 0.0, RLOO 0.05)")
    num_generations: int = setting(8, "completions sampled per prompt (the group its advantages compare within); for "
                                      "both algos (TRL's own defaults: GRPO 8, RLOO 2)")
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
        check_limits(self, "max_prompts")
        # TRL's use_vllm true as given (--use_vllm, a recipe key, a variable): what refuses vLLM after the parse
        # (alignkit.core.launch.vllm_refused) names it, not a --backend vllm never typed.
        label = ((SETTING_SOURCES.get() or {}).get("backend") or ("", ""))[1]
        if "use_vllm" in label.lower() and self.backend == "vllm":
            object.__setattr__(self, "_vllm_as_given", label)
        if self.dataset_mixture or self.dataset_test_split:
            raise ValueError("rl.py reads prompts from --dataset_id and measures the reward on its own samples: drop "
                             "dataset_mixture / dataset_test_split")
        overrides = self.trainer_overrides if isinstance(self.trainer_overrides, dict) else {}
        evaluation = str(getattr(overrides.get("eval_strategy"), "value", overrides.get("eval_strategy"))).lower()
        if (self.eval_split or evaluation not in ("none", "no") or self.eval_steps
                or overrides.get("num_generations_eval") is not None):
            raise ValueError("rl.py holds no data out: it measures the reward on its own samples, logged every "
                             "--logging_steps (training.png); drop eval_split / eval_strategy / eval_steps / "
                             "num_generations_eval")
        if self.max_length is not None:
            raise ValueError(f"--max_length {self.max_length} has no effect in rl.py: TRL's GRPO/RLOO keep each "
                             "prompt whole and stop the answers at --max_completion_length; drop it, and keep long "
                             "prompts out of the data (--max_prompts, or a filtered file)")
        if self.algo == "grpo" and isinstance(overrides.get("loss_type"), str):
            from alignkit.train.losses import check_grpo_loss_type

            check_grpo_loss_type(overrides["loss_type"])  # TRL would say so at the first step
        if "scale_rewards" in overrides:  # GRPOTrainer raises "Invalid value" at its first step, after the load
            scale = overrides["scale_rewards"]
            if {True: "group", False: "none"}.get(scale, scale) not in ("group", "batch", "none", "true", "false"):
                raise ValueError(f"scale_rewards must be group, batch or none (true is group, false is none), got "
                                 f"{scale!r}")
        if synced := [k for k in ("sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha") if k in overrides]:
            raise ValueError(f"{', '.join(synced)} has no effect in rl.py: TRL does not support syncing the reference "
                             "with a PEFT adapter (the reference is the policy with its adapter off); drop it")
        if cast := [k for k in ("use_transformers_paged", "use_transformers_continuous_batching") if overrides.get(k)]:
            raise ValueError(f"{cast[0]} is not supported by rl.py: TRL casts the whole model, the trained adapter "
                             "included, to bf16/fp16 before each of its generations, undoing the adapter's fp32 "
                             "weights; drop it (transformers' generate, or --backend vllm on a GPU)")
        if "max_tool_calling_iterations" in overrides:
            raise ValueError("max_tool_calling_iterations has no effect in rl.py: it passes no tools or environments "
                             "to TRL's trainer; drop it")
        if not self.reward:  # TRL too refuses to train with no reward function
            raise ValueError("rl.py needs --reward: judge (an OpenAI-compatible judge), rm:FOLDER (a reward.py run), "
                             "python:module:function (your own), or rule (the tiny preset's word check)")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare completions of one prompt), got "
                             f"{self.num_generations}")
        if self.beta < 0:
            raise ValueError(f"--beta must be >= 0 (the KL pull towards the reference; 0: none), got {self.beta}")
        if self.max_completion_length < 1:
            raise ValueError(f"--max_completion_length must be at least 1 (tokens per sampled completion), got "
                             f"{self.max_completion_length}")
        if isinstance(iterations := overrides.get("num_iterations"), int) and iterations < 1:
            # TRL's sampler repeats each generation batch num_iterations times: 0 yielded no batch, so the run
            # trained 0 steps and saved an untrained adapter with exit status 0.
            raise ValueError(f"num_iterations must be >= 1 (the optimisation passes over each generation's "
                             f"completions; 0 trains nothing), got {iterations}")
        if self.temperature <= 0:  # TRL samples every rollout: transformers refused 0 after the model loaded
            raise ValueError(f"temperature must be > 0 (each prompt's completions are sampled; their differences are "
                             f"what GRPO/RLOO learn from), got {self.temperature}")
        sampling = overrides.get("generation_kwargs") if isinstance(overrides.get("generation_kwargs"), dict) else {}
        greedy = [f"{k} {str(v).lower()}" for k, v in sampling.items()
                  if (k == "do_sample" and v is False) or (k == "temperature" and isinstance(v, (int, float)) and v <= 0)]
        if greedy:  # TRL puts generation_kwargs over its own do_sample True and --temperature: greedy, without a word
            raise ValueError(f"generation_kwargs {greedy[0]} decodes greedily: every completion of a prompt is the same, "
                             "so every advantage is 0 (their differences are what GRPO/RLOO learn from); drop it "
                             "(--temperature sets the sampling)")
        for name in ("epsilon", "epsilon_high"):  # TRL clips the policy ratio to [1 - epsilon, 1 + epsilon_high]
            if isinstance(clip := overrides.get(name), (int, float)) and clip < 0:
                raise ValueError(f"{name} must be >= 0, got {clip}: below 0 the clip range leaves out the ratio 1 "
                                 "each generation starts at, so the tokens of that advantage's sign get no gradient")
        per_generation, how = self.generation_batch()
        if per_generation % self.num_generations:  # TRL's line came after the model loaded
            raise ValueError(f"TRL's generation_batch_size ({per_generation} = {how}) must be a multiple of "
                             f"num_generations ({self.num_generations}): each generation samples whole groups of one "
                             "prompt's completions; change --num_generations, or the batch (--per_device_train_batch_"
                             "size, --steps_per_generation or --generation_batch_size)")
        if twice := sorted({r for r in self.reward if self.reward.count(r) > 1}):  # one name: TRL logs one column
            raise ValueError(f"--reward lists {twice[0]} twice: give each reward once and weigh it with "
                             "--reward_weights")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward)} rewards "
                             f"{self.reward}")
        if "judge" in self.reward and self.judge_mode == "pairwise" and not self.reference_completions:
            raise ValueError("--judge_mode pairwise needs --reference_completions FILE (prompt + response rows)")

    def generation_batch(self) -> tuple[int, str]:
        """(TRL's generation_batch_size, how it comes about): the completions one generation samples over every
        process, as GRPOConfig and RLOOConfig derive it (their __post_init__): --generation_batch_size as given, a
        multiple of the global batch; else per_device_train_batch_size x processes x steps_per_generation, which is
        gradient_accumulation_steps unless given. Refuses what TRL would refuse after the model loaded."""
        from alignkit.core.launch import world_size

        overrides = self.trainer_overrides if isinstance(self.trainer_overrides, dict) else {}
        given, steps = overrides.get("generation_batch_size"), overrides.get("steps_per_generation")
        processes = world_size()
        global_batch = self.per_device_train_batch_size * processes
        if given is not None and steps is not None:
            raise ValueError("generation_batch_size and steps_per_generation cannot both be set (TRL derives each from "
                             "the other): drop one")
        for name, value in (("generation_batch_size", given), ("steps_per_generation", steps)):
            if value is not None and int(value) < 1:  # 0 sampled no prompt: 0 steps trained, an untrained adapter saved
                raise ValueError(f"{name} must be >= 1 (each generation samples a batch of completions to train "
                                 f"on; 0 trains nothing), got {value}")
        if given is not None:
            if int(given) % global_batch:
                raise ValueError(f"generation_batch_size ({given}) must be a multiple of per_device_train_batch_size x "
                                 f"processes ({global_batch}): TRL trains each generation in whole batches; change "
                                 "either, or give --steps_per_generation instead")
            return int(given), "--generation_batch_size"
        named = "steps_per_generation" if steps is not None else "gradient_accumulation_steps"
        steps = int(steps) if steps is not None else self.gradient_accumulation_steps
        return global_batch * steps, (f"per_device_train_batch_size {self.per_device_train_batch_size} x {processes} "
                                      f"process{'es' if processes != 1 else ''} x {named} {steps}")


# ---------------------------------------------------------------- rlaif.py
@dataclass
class RLAIFSettings(TemplateArgumentsSettings, JudgeEndpointSettings, DPOSettings):
    """rlaif.py: rounds of sample (label.py) -> judge (label.py) -> DPO (dpo.py) -> evaluate (evaluate.py pairwise).

    The DPO settings apply to every round's dpo.py run; the loader settings (--dtype, --chat_template,
    --attn_implementation, ...) to label.py and evaluate.py too, so the policy samples and is judged as it is
    trained; --revision and --gguf_file name the starting model in round 1's three runs (a later policy is a run
    folder that records its base); the judge endpoint group goes to both label.py and evaluate.py; label.py and
    evaluate.py get the settings below, and anything else through --label_args / --evaluate_args.
    """

    help_title: ClassVar[str] = "rounds (and DPO)"
    reads_test_split: ClassVar[bool] = False  # each round's labelled pairs, with an --eval_split share
    takes_mixture: ClassVar[bool] = False  # refused in one line (__post_init__)
    help_texts: ClassVar[dict[str, str]] = {  # the shared fields it refuses (__post_init__)
        "dataset_test_split": "refused by rlaif.py: each round trains on the pairs it labels (held out: --eval_split)",
        "dataset_mixture": "refused by rlaif.py: each round labels pairs on --dataset_id's prompts"}

    dataset_id: str = setting("HuggingFaceH4/ultrafeedback_binarized", "prompts: .jsonl/.json/.csv/.parquet file "
                                                                       "or Hub dataset id (label.py --prompts)")
    dataset_split: str = setting("train_prefs", "split of a Hub prompt dataset (label.py --prompts_split)")
    dataset_config: str | None = setting(None, "configuration name of a Hub prompt dataset")
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
    prompt_field: str = setting("prompt", "column holding the prompt: text, or role/content messages")
    eval_prompts: str | None = setting(None, "prompts each round is judged on (a file or Hub dataset, read like "
                                             "--dataset_id); default: the preset's, else --dataset_id")
    eval_prompts_split: str | None = setting(None, "split of a Hub --eval_prompts; default: --dataset_split with "
                                                   "train read as test (train_prefs: test_prefs)")
    eval_max_prompts: int | None = setting(None, "judge each round on the first N distinct eval prompts; default all")
    label_args: str = setting("", "further label.py flags for every round, e.g. '--parallel 16 --both_orders false'",
                              flags=True)
    evaluate_args: str = setting("", "further evaluate.py pairwise flags for every round, e.g. '--parallel 8'",
                                 flags=True)

    def __post_init__(self):
        super().__post_init__()
        check_limits(self, "max_prompts", "eval_max_prompts")
        if self.rounds < 1 or self.num_samples < 2:
            raise ValueError(f"rounds must be >= 1 and num_samples >= 2, got {self.rounds} and {self.num_samples}")
        if (self.eval_judge_model or "").startswith("rm:"):  # was refused by round 1's evaluate.py, as --judge_model
            raise ValueError(f"--eval_judge_model {self.eval_judge_model}: evaluate.py pairwise judges by an LLM "
                             "(--eval_judge_model NAME), rule or python:module:function; a reward model judges the "
                             "pairs through --judge rm:FOLDER")
        if self.dataset_mixture or self.dataset_test_split:  # dpo.py trained on them instead of the round's labels
            raise ValueError("rlaif.py trains each round on the pairs it labels from --dataset_id's prompts: drop "
                             "dataset_mixture / dataset_test_split (held-out pairs: --eval_split; judged prompts: "
                             "--eval_prompts)")
        from alignkit.train.losses import is_reference_free

        if self.reference == "start" and is_reference_free(self.loss_type):
            raise ConfigError(f"--reference start has no effect with --loss_type {self.loss_type[0]}: it reads no "
                              "reference model; drop it")
        if self.adapter == "lota" and self.reference == "start" and self.rounds > 1:
            # Round r loads the earlier rounds' LoTA deltas into the weights, where no reference can switch them off.
            raise ValueError("--adapter lota with --reference start is not supported past round 1 (the earlier rounds' "
                             "deltas are part of the loaded weights): use --reference previous, or --adapter lora")


# ---------------------------------------------------------------- kto.py
@dataclass
class KTOSettings(TrainSettings):
    """kto.py: KTO on unpaired, labelled answers (alignkit.train.kto); TRL's KTOConfig names."""

    run_type: ClassVar[str] = "kto"
    help_title: ClassVar[str] = "KTO"
    notebook_cells: ClassVar[dict[str, str]] = {
        "settings": "Settings", "data": "Data", "run folder": "Run folder and model", "model": "Run folder and model",
        "rule-following": "Rule-following before training (the tiny preset)", "train": "Train",
        "save": "Save, evaluate, merge, push"}
    trl_configs: ClassVar[tuple[str, ...]] = ("KTOConfig",)
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
        "default: all (the model you start from); 0: the bare base (refused over a LoTA delta, which the "
        "weights hold)")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError(f"beta, desirable_weight and undesirable_weight must be > 0, got {self.beta}, "
                              f"{self.desirable_weight} and {self.undesirable_weight}")
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ConfigError("--loss_type kto estimates its KL baseline from mismatched answers in a batch: pass "
                              "--per_device_train_batch_size 2 or more (or --loss_type apo_zero_unpaired)")
