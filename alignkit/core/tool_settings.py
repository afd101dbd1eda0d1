"""The settings of the scripts that do not train: label.py, evaluate.py's commands and merge.py, composed of the
shared groups of alignkit.core.groups (re-exported by alignkit.core.config)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from dataclasses import field as _field  # init=False: a field that is not a flag
from pathlib import Path
from typing import ClassVar

from alignkit.core.args import ConfigError, setting
from alignkit.core.environment import SETTING_SOURCES
from alignkit.core.groups import (
    GenerationSettings,
    HubPushSettings,
    JudgeAnswerSettings,
    JudgeEndpointSettings,
    ModelSettings,
    _chain_post_init,
    check_limits,
    check_seed,
)

logger = logging.getLogger("alignkit")

# evaluate.py mt_bench, pairwise and lm_eval name every model in --models: where its revision and GGUF file go.
MODELS_NAME_THEIRS = {
    "revision": "each model takes its own revision in --models, as NAME=ID@REVISION",
    "gguf_file": "a GGUF model goes in --models, as NAME=FOLDER/FILE.gguf or NAME=OWNER/REPO/FILE.gguf",
    "model_id": "name the models in --models, as NAME=ID_OR_PATH",
}


# lm_eval's own flags that evaluate.py lm_eval takes otherwise: what to pass instead.
LM_EVAL_FLAGS_THEIRS = {
    **MODELS_NAME_THEIRS,
    "model_args": "alignkit loads each model and hands it to lm_eval: its loader flags (--dtype, --quantization, "
                  "--attn_implementation, --trust_remote_code, --chat_template) apply to every model, and a revision "
                  "goes in --models, as NAME=ID@REVISION",
    "device": "alignkit's loader puts each model on the first visible GPU (pick it with CUDA_VISIBLE_DEVICES=N), "
              "else on the CPU (--num_threads)",
    "log_samples": "evaluate.py lm_eval keeps each model's results (OUTPUT_DIR/models/NAME.json), not lm_eval's "
                   "per-example samples; for those run lm_eval itself with --log_samples --output_path DIR on the "
                   "model's folder (an adapter merged first by merge.py)",
    **dict.fromkeys(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"),
                    "--seed sets lm_eval's four seeds at once (random, numpy, torch and few-shot)"),
}


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
    grade_pairs: bool = setting(
        False, "--mode pointwise: also write preference pairs for dpo.py to OUTPUT.pairs.jsonl, each prompt's "
        "best-graded answer over its worst (UltraFeedback's binarization; none where they tie)")
    # Prompts
    prompts: str | None = setting(
        None, "prompts: .jsonl/.json/.csv/.parquet file or Hub dataset id; default: the prompts of --responses_a"
    )
    prompt_field: str = setting("prompt", "column holding the prompt: text, or role/content messages")
    prompts_split: str = setting("train", "split of a Hub prompt dataset")
    prompts_config: str | None = setting(None, "configuration name of a Hub prompt dataset")
    max_prompts: int | None = setting(None, "use only the first N distinct prompts")
    skip_invalid: bool = setting(False, "skip prompt and response rows that fail validation (and report how many) "
                                        "instead of stopping; a prompt whose response row was skipped has no pair")
    # Where the responses come from
    model_a: str | None = setting(
        None, "generator A: Hub id (at a revision: ID@REVISION), local or adapter folder, or openai:MODEL for an "
        "OpenAI-compatible endpoint"
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
    output: str | None = setting(None, "output .jsonl; default: runs/label-<prompts>/<preferences|completions|labels>.jsonl (by --mode)")
    cache_dir: str | None = setting(None, "cache of responses and judgments a rerun resumes from; default: OUTPUT.cache")
    seed: int = setting(42, "seed for sampling")

    def __post_init__(self):
        super().__post_init__()  # the judge endpoint's and the Hub push's checks
        check_limits(self, "max_prompts")
        if self.num_samples == 1 or self.num_samples < 0:
            raise ValueError(f"num_samples must be 0 (off) or >= 2, got {self.num_samples}")
        for name in ("generation_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.rm_tie_margin < 0:
            raise ValueError(f"rm_tie_margin must be >= 0, got {self.rm_tie_margin}")
        if self.rm_tie_margin and not str(self.judge).startswith("rm:"):  # it was ignored without a word
            raise ValueError(f"--rm_tie_margin {self.rm_tie_margin} applies to a reward-model judge (--judge "
                             f"rm:RUN_FOLDER), not --judge {self.judge}: drop it")
        if self.rm_tie_margin and self.mode == "pointwise":  # a grade against --grade_threshold has no tie
            raise ValueError(f"--rm_tie_margin {self.rm_tie_margin} applies to --mode pairs; --mode pointwise grades "
                             "each answer against --grade_threshold: drop it")
        if self.grade_pairs and self.mode != "pointwise":
            raise ValueError(f"--grade_pairs makes pairs from --mode pointwise's grades; --mode {self.mode} does not "
                             "grade: drop it, or pass --mode pointwise")
        if self.grade_threshold is not None and self.mode != "pointwise":  # it was ignored without a word
            raise ValueError(f"--grade_threshold {self.grade_threshold} applies to --mode pointwise's grades; --mode "
                             f"{self.mode} does not grade: drop it, or pass --mode pointwise")
        sources = SETTING_SOURCES.get()  # the preset's judge (the tiny one's rule) is no judge given for this run
        given = sources is None or sources.get("judge", ("preset",))[0] not in ("env", "preset")
        default = next(f.default for f in fields(self) if f.name == "judge")
        if self.mode == "completions" and given and self.judge != default:
            raise ValueError(f"--judge {self.judge} judges --mode pairs and grades --mode pointwise; --mode completions "
                             "asks no judge: drop it")
        self.check_judge_reads()
        check_seed(self.seed)

    # The judge settings only some judges read, and which (`--judge` kinds): set for another, they were ignored
    # without a word (--principle under a python: judge, --judge_model under rm:: the label.py audit of session 68).
    JUDGE_READERS: ClassVar[dict[str, tuple[str, ...]]] = {
        **dict.fromkeys(("judge_model", "judge_template", "principle", "judge_max_tokens", "judge_temperature"),
                        ("openai", "hf")),
        "judge_revision": ("hf",), "judge_base_url": ("openai",), "judge_api_key_env": ("openai",),
    }

    def check_judge_reads(self) -> None:
        """Refuse, in one line naming the first, the judge settings given away from their defaults that the chosen
        judge never reads: an LLM judge's under a python: or rm: judge (or none, in --mode completions), an
        endpoint's under --judge hf, a local model's under --judge openai; --principle and --judge_template under
        --mode pointwise, whose LLM grader has FastChat's single-answer template (it reads no principle). Only a
        value given for this run is refused (a flag, a --config key, a notebook's overrides): the environment and
        .env are every script's (evaluate.py reads its judge there, rlaif.py's steps inherit them), so a value from
        there, or from the preset, that this judge does not read is put back to its default with one info line."""
        judge = str(self.judge)
        kind = "python" if judge.startswith("python:") else "rm" if judge.startswith("rm:") else judge
        if self.mode != "completions" and kind not in ("python", "rm", "openai", "hf"):
            return  # an unknown --judge: make_judge names it
        defaults = {f.name: f.default for f in fields(self) if f.name in self.JUDGE_READERS}
        pairs_only = self.mode == "pointwise"  # no pointwise grader reads these two

        def reads(n):
            return self.mode != "completions" and kind in self.JUDGE_READERS[n] and not (
                pairs_only and n in ("principle", "judge_template"))

        unread = [n for n in self.JUDGE_READERS if getattr(self, n) != defaults[n] and not reads(n)]
        sources = SETTING_SOURCES.get()  # None: built directly, every value the caller's
        ignored = [n for n in unread if sources is not None and sources.get(n, ("preset",))[0] in ("env", "preset")]
        if ignored:
            logger.info(f"not read by {self._judge_named(kind, judge, short=True)}, so left at the default: "
                        + ", ".join(f"{n} {getattr(self, n)!r} ("
                                    f"{sources[n][1] if n in sources else f'preset {self.preset!r}'})" for n in ignored))
            for n in ignored:
                setattr(self, n, defaults[n])
            unread = [n for n in unread if n not in ignored]
        if not unread:
            return
        n = unread[0]
        readers = " or ".join(self.JUDGE_READERS[n])
        if self.mode == "pointwise" and n in ("principle", "judge_template") and kind in ("openai", "hf"):
            raise ValueError(f"--{n} is read only in --mode pairs; --mode pointwise grades each answer with FastChat's "
                             "single-answer template, which takes no other template and no principle: drop it")
        if self.mode == "pointwise" and n in ("principle", "judge_template"):  # an LLM would not read it either
            raise ValueError(f"--{n} is read only by an LLM judge (--judge openai or hf) in --mode pairs, not by "
                             f"{self._judge_named(kind, judge)}, in --mode pointwise: drop it")
        raise ValueError(f"--{n} is read only by --judge {readers}, not by {self._judge_named(kind, judge)}: drop it"
                         + (f", or judge with an LLM (--judge {readers})"
                            if self.mode != "completions" and kind in ("python", "rm") else ""))

    def _judge_named(self, kind, judge, short=False) -> str:
        if self.mode == "completions":
            return "--mode completions" + ("" if short else ", which asks no judge (it writes a teacher's answers)")
        return f"--judge {judge}" + ("" if short else {
            "python": ", a function of the prompt and the answers", "rm": ", a reward model that scores each answer",
            "openai": ", an endpoint", "hf": ", a local model"}[kind])


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
        for name in ("max_new_tokens", "num_beams", "batch_size"):  # the one at fault, as temperature's error says
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        check_seed(self.seed)


@dataclass
class VibesSettings(EvalSettings):
    """evaluate.py vibes: a quick look at one model's answers, or two side by side."""

    preset: str | None = setting(
        None, "named defaults: 'tiny' or 'smol' (SmolLM2-135M) asks that model its own prompts"
    )
    compare_to: str | None = setting(None, "second model (Hub id, folder, adapter or merged folder; a Hub id at a "
                                           "revision: ID@REVISION) shown beside the first")
    prompts: list[str] = setting([], "prompts to ask, each one quoted: --prompts \"Hi!\" \"Name three fruits.\" "
                                     "(instead of a preset's prompts; before --prompts_file's where both are given)",
                                 whole=True)
    prompts_file: str | None = setting(None, "JSONL of {\"prompt\": ...} rows, or a .txt file with one prompt a line")
    system_prompt: str | None = setting(None, "system message put before every prompt")
    max_new_tokens: int = setting(256, "longest answer, in tokens")
    temperature: float = setting(0.7, "sampling temperature; 0 is greedy")
    output_file: str | None = setting(None, "JSONL written with every answer; default: outputs/vibes-<time>.jsonl")


@dataclass
class MTBenchSettings(JudgeAnswerSettings, EvalSettings):
    """evaluate.py mt_bench: answers to MT-Bench, judged pairwise by an OpenAI-compatible model through FastChat."""

    # The models come from --models, each with its own revision or GGUF file; the other loader settings apply to each.
    model_id: str = _field(default="", init=False)
    revision: str | None = _field(default=None, init=False)
    gguf_file: str | None = _field(default=None, init=False)
    elsewhere: ClassVar[dict] = MODELS_NAME_THEIRS
    models: list[str] = setting([], "models to compare, as NAME=ID_OR_PATH (Hub id, local, adapter or merged folder; "
                                    "a Hub id at a revision: NAME=ID@REVISION; a GGUF file: NAME=FOLDER/FILE.gguf "
                                    "or NAME=OWNER/REPO/FILE.gguf)")
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
    answers_from: list[str] = setting(
        [], "other evaluation folders (their --output_dir) whose answers are reused where the same model as loaded, "
            "sampled alike, answered the same question (rlaif.py passes the round before)")

    def __post_init__(self):
        super().__post_init__()  # the judge endpoint's checks, then the generation settings'
        if self.bootstrap_rounds < 1:
            raise ValueError(f"bootstrap_rounds must be >= 1, got {self.bootstrap_rounds}")
        check_limits(self, "max_questions")
        if not self.models:
            raise ValueError("pass the models to compare: --models NAME=ID_OR_PATH NAME=ID_OR_PATH ...")
        if not self.judge_model:
            raise ValueError("pass the judge: --judge_model NAME (a model served by an OpenAI-compatible endpoint)")
        for folder in self.answers_from:  # a mistyped folder reused nothing, without a word
            if not Path(folder).is_dir():
                raise ValueError(f"--answers_from {folder}: no such folder; pass an earlier evaluation's --output_dir "
                                 "(it holds model_answer/)")


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
    max_instances: int | None = setting(None, "evaluate N instructions, the ones alpaca_eval's max_instances "
                                              "picks (shuffled with its seed 123); for quick runs")
    reference_outputs: str | None = setting(
        None, "reference outputs in AlpacaEval's format (instruction, output, generator); default: AlpacaEval 2's "
        "GPT-4 Turbo outputs with the default eval set"
    )
    reference_model: str | None = setting(
        None, "generate the reference outputs with this model (e.g. the base; a Hub id at a revision: ID@REVISION); "
        "--reference_outputs wins over it"
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
        check_limits(self, "max_instances")


@dataclass
class MergeSettings(HubPushSettings):
    """merge.py: adapters merged into their base, checked, saved, and optionally pushed."""

    preset: str | None = setting(None, "named defaults: 'tiny' merges runs/tiny-dpo, 'smol' runs/smol-dpo")
    adapter_dir: str | None = setting(None, "adapter folder (a training run); chains (SFT then DPO) merge in order")
    base_model: str | None = setting(None, "base model to merge into; default: the one the adapter records")
    add_delta: str | None = setting(
        None, "LoTA task merge: a second delta folder; adapter_dir's delta + this one go to output_dir as one delta"
    )
    output_dir: str | None = setting(None, "where the merged model goes; default: <adapter_dir>/merged (for a "
                                           "checkpoint-N, merged-checkpoint-N beside it)")
    dtype: str = setting("auto", "weights of the merged model; auto: bf16 on CUDA, fp32 on CPU",
                         choices=["auto", "bf16", "fp16", "fp32"])
    dequantize: str = setting(
        "auto", "true: merge into the base rounded to the 4-bit format its QLoRA run trained over (NF4 unless it "
        "chose fp4), dequantized: the exact model the adapter was trained on; false: into the full-precision base; "
        "auto: true for a reward model trained with QLoRA (its scores are the product), else false",
        choices=["auto", "true", "false"],
    )
    max_shard_size: str = setting("5GB", "largest safetensors shard")
    trust_remote_code: bool = setting(False, "run custom model code shipped with the checkpoint; off unless asked")
    push: str = setting("merged", "what to push: the merged model, or the adapter alone", choices=["merged", "adapter"])

    def __post_init__(self):
        if not self.adapter_dir:
            raise ValueError("pass the adapter to merge: --adapter_dir RUN_FOLDER (or --preset tiny)")
        super().__post_init__()


@dataclass
class LMEvalSettings(ModelSettings):
    """evaluate.py lm_eval: EleutherAI's lm-evaluation-harness on a base model and its tuned versions (the alignment
    tax), its own tasks and metrics (alignkit.evals.harness). The loader settings apply to every model; lm_eval's
    tasks carry their own prompts and generation settings, so none of evaluate.py's generation flags apply."""

    # The models come from --models, each with its own revision or GGUF file; the other loader settings apply to each.
    model_id: str = _field(default="", init=False)
    revision: str | None = _field(default=None, init=False)
    gguf_file: str | None = _field(default=None, init=False)
    elsewhere: ClassVar[dict] = LM_EVAL_FLAGS_THEIRS
    backend: str = _field(default="transformers", init=False)  # lm_eval runs its HF class on the loaded model
    num_beams: int = _field(default=1, init=False)
    preset: str | None = setting(None, "named defaults: 'tiny' runs the base model and the tiny runs on a local task")
    models: list[str] = setting([], "models side by side, as NAME=ID_OR_PATH (Hub id, local, adapter or merged folder; "
                                    "a Hub id at a revision: NAME=ID@REVISION; a GGUF file: NAME=FOLDER/FILE.gguf "
                                    "or NAME=OWNER/REPO/FILE.gguf)")
    tasks: list[str] = setting([], "lm_eval task names as lm_eval lists them, e.g. ifeval gsm8k mmlu hellaswag")
    include_path: str | None = setting(None, "folder of extra lm_eval task YAML configs (e.g. a task over local files)")
    num_fewshot: int | None = setting(None, "few-shot examples per prompt; default: each task's own")
    limit: float | None = setting(None, "at most N examples per task (a share when < 1); for quick runs, not for reporting")
    apply_chat_template: bool = setting(True, "wrap each prompt in the model's chat template (tuned chat models expect it)")
    fewshot_as_multiturn: bool | None = setting(
        None, "under the chat template, each few-shot example a turn of the conversation (true) or all of them in "
        "one user turn (false); default: true where the template is applied (lm_eval's)")
    system_instruction: str | None = setting(
        None, "lm_eval's system instruction before every prompt: the chat template's system turn, or the prompt's "
        "start without it")
    gen_kwargs: list[str] = setting(
        [], "lm_eval's generation arguments for its generate_until tasks, as lm_eval takes them: KEY=VALUE ... or "
        "KEY=VALUE,KEY=VALUE or a JSON object, e.g. temperature=0 max_gen_toks=512", whole=True)
    bootstrap_iters: int = setting(100000, "lm_eval's bootstrap resamples for the standard errors of metrics "
                                           "without a closed form; 0: no standard errors")
    batch_size: str = setting("8", "lm_eval's batch size: N, auto (the largest that fits, found from 64 down), or "
                                   "auto:N (found again N times over the run)")
    seed: int = setting(42, "lm_eval's seeds, all four (its random_seed, numpy_random_seed, torch_random_seed and "
                            "fewshot_random_seed)")
    output_dir: str = setting("outputs/lm_eval", "results.md, results.json, results.png and each model's kept results")

    def __post_init__(self):
        _chain_post_init(self, LMEvalSettings)
        size = str(self.batch_size).strip().lower()
        if not re.fullmatch(r"[1-9][0-9]*|auto(:[1-9][0-9]*)?", size):  # lm_eval's HF class takes these
            raise ConfigError(f"--batch_size {self.batch_size}: give a number of 1 or more, auto (the largest that "
                              "fits), or auto:N (found again N times over the run)")
        self.batch_size = int(size) if size.isdigit() else size
        if self.fewshot_as_multiturn and not self.apply_chat_template:  # as lm_eval refuses it: no turns without it
            raise ConfigError("--fewshot_as_multiturn true puts the few-shot examples in turns of the chat template: "
                              "drop it, or pass --apply_chat_template true")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"--bootstrap_iters must be >= 0 (0: no standard errors), got {self.bootstrap_iters}")
        if not self.models:
            raise ConfigError("pass the models: --models NAME=ID_OR_PATH ... (e.g. base=org/model dpo=runs/dpo-run)")
        if not self.tasks:
            raise ConfigError("pass the tasks: --tasks NAME ... (lm_eval's names, e.g. ifeval gsm8k mmlu)")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit must be > 0 (examples per task, or a share below 1; leave it unset for every "
                              f"example), got {self.limit:g}")
        if self.limit is not None and self.limit > 1 and self.limit != int(self.limit):
            # lm_eval reads a limit of 1 or more as a count and drops the fraction: 2.5 ran 2 examples a task.
            raise ConfigError(f"--limit {self.limit:g}: give a whole number of examples per task, or a share below 1 "
                              "(0.1: a tenth of each task)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            # lm_eval takes any int: a negative one ran every task zero-shot, under results.md's "few-shot: -1".
            raise ConfigError(f"--num_fewshot must be >= 0 (examples per prompt; leave it unset for each task's own), "
                              f"got {self.num_fewshot}")
        check_seed(self.seed)
