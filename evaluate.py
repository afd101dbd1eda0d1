# %% [markdown]
# # Evaluate: vibes, MT-Bench pairwise judging through FastChat, AlpacaEval through alpaca_eval
#
# Five commands, each with its own settings (`python evaluate.py COMMAND --help`):
# - `vibes`: ask one model (Hub id, local folder, adapter or merged folder) a few prompts, or two models side
#   by side; the answers are printed and written as JSONL.
# - `mt_bench`: the 80 two-turn MT-Bench questions answered by each model, then judged pairwise by any
#   OpenAI-compatible model through FastChat's judge code (pair-v2, pair-v2-multi-turn, pair-math-v1 with
#   reference answers; both answer orders). Win / loss / tie and adjusted win rate with a bootstrap 95% CI,
#   overall and per category: a table, `results.json` and `results.png`.
# - `pairwise`: the same flow on your own single-turn prompts. With `--preset tiny` it runs offline: the
#   tiny demo's SFT run against the DPO run trained on top of it, on the demo's prompts, with its rule judge.
# - `alpaca_eval`: AlpacaEval win rates (raw and length-controlled) against reference outputs, annotated and
#   scored by the `alpaca_eval` package itself; `--preset tiny` runs offline with the rule judge.
# - `lm_eval`: the alignment tax: EleutherAI's lm-evaluation-harness tasks (its own configs and metrics) on a
#   base model and its tuned versions, side by side; `--preset tiny` runs offline on a local task.
#
# ```bash
# python evaluate.py vibes --model_id runs/dpo-run --compare_to runs/sft-run --prompts "Hi!" "Name three fruits."
# python evaluate.py vibes --model_id runs/dpo-run/merged --prompts_file prompts.jsonl --temperature 0
# python evaluate.py vibes --model_id runs/sft-run --prompts_file prompts.jsonl --backend vllm  # GPU + pip install vllm
# python evaluate.py mt_bench --models base=mistralai/Mistral-7B-Instruct-v0.2 dpo=runs/dpo-run --judge_model gpt-4o
# python evaluate.py mt_bench --models sft=runs/sft-run dpo=runs/dpo-run --mode pairwise-all \
#     --judge_model Qwen/Qwen2.5-72B-Instruct --judge_base_url http://localhost:8000/v1 --parallel 8
# python evaluate.py mt_bench ... --mt_bench_data FastChat/fastchat/llm_judge/data --max_questions 10
# python sft.py --preset tiny && python dpo.py --preset tiny --model_id runs/tiny-sft
# python evaluate.py pairwise --preset tiny                      # offline: DPO against SFT, rule-judged
# python label.py --preset smol && python dpo.py --preset smol
# python evaluate.py pairwise --preset smol                      # offline: SmolLM2 + DPO against SmolLM2
# python evaluate.py alpaca_eval --model_id runs/dpo-run --reference_model mistralai/Mistral-7B-Instruct-v0.2
# python evaluate.py alpaca_eval --preset tiny                   # offline: DPO against SFT, rule-judged
# python evaluate.py lm_eval --models base=mistralai/Mistral-7B-Instruct-v0.2 dpo=runs/dpo-run --tasks ifeval gsm8k mmlu
# python evaluate.py lm_eval --preset tiny                       # offline: base, SFT and DPO on a local task
# ```
#
# Everything lands in `--output_dir` in FastChat's layout (`model_answer/`, `model_judgment/`), and a rerun
# picks up where the last run stopped: answered questions are not generated again, judged matches are not
# sent again (a match whose judge request failed is).

# %% [markdown]
# ## Command and settings
# The first argument names the command; the rest are its settings: defaults < `--preset` < `.env` <
# environment < `--config recipe.yaml` < flags < `overrides`. In a notebook, set `NOTEBOOK_COMMAND` and
# `overrides` below (or environment variables, COMMAND for the command) instead of touching argv. The engine
# every model answers on is chosen once: `--backend vllm` without vLLM stops here, before any work.

# %%
import os

from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)
from alignkit.core.args import command_line, is_notebook
from alignkit.evals.evaluation import parse_command
from alignkit.modeling.generation import resolve_backend
from alignkit.train.report import show  # in a notebook, each chart below its cell

# In a notebook, set things here instead of on a command line, e.g. NOTEBOOK_COMMAND = "pairwise" and
# overrides = {"preset": "tiny"}; environment variables (ALIGNKIT_<NAME>, COMMAND for the command) work too.
NOTEBOOK_COMMAND: str = os.environ.get("COMMAND", "vibes")
overrides: dict = {}
argv = command_line()  # the flags, where there is a command line (none in a kernel's cell; %run's are read)
command, settings = parse_command(argv, NOTEBOOK_COMMAND if is_notebook() and not argv else None, overrides)
from alignkit.core.launch import establish_launch

establish_launch(settings, "evaluate.py")  # the process's device, the process group, what this launch refuses
backend = resolve_backend(settings.backend, settings.num_beams)

# %% [markdown]
# ## Vibes
# Batched generation through each model's chat template with the generation prompt (left padding, so a
# batch answers at once), one model in memory at a time. Base models, adapters (chains included) and merged
# folders all load the same way; on `--backend vllm`, a base model or one adapter on it (merge a chain first).
# Printed side by side, and written to `--output_file` (one JSON row per prompt).

# %%
if command == "vibes":
    from alignkit.evals import evaluation

    prompts, sources, answers = evaluation.vibes(settings, backend)
    evaluation.show_vibes(prompts, sources, answers)
    output_file = evaluation.save_vibes(settings, prompts, sources, answers)
    print(f"\n{len(prompts)} prompt{'' if len(prompts) == 1 else 's'}; answers written to {output_file}")

# %% [markdown]
# ## Pairwise judging (mt_bench, pairwise)
# ### The judge
# Created first, so a missing API key stops the run before any model is loaded: the key comes from
# `--judge_api_key_env` (default OPENAI_API_KEY, also read from `.env`); a `--judge_base_url` server may need
# none. `--judge_model rule` (pairwise only) is the tiny preset's rule judge and calls nothing.

# %%
if command in ("mt_bench", "pairwise"):
    from alignkit.evals.evaluation import Pairwise

    run = Pairwise.start(command, settings)

# %% [markdown]
# ### Questions
# MT-Bench: FastChat's `question.jsonl`, judge prompts and GPT-4 reference answers (math, reasoning, coding
# are judged against them). `pairwise`: your prompts file, one turn each.

# %%
if command in ("mt_bench", "pairwise"):
    run.load_questions()
    print(f"{len(run.questions)} questions, {len(run.models)} models: "
          f"{', '.join(f'{n}={s}' for n, s in run.models.items())}")

# %% [markdown]
# ### Answers
# Our own generation, not FastChat's gen_model_answer (which hard-codes CUDA and FastChat's own prompt
# templates): each model's chat template, every turn asked with the conversation so far. Temperature: FastChat's
# per-category MT-Bench values unless `--temperature` is given. Written in FastChat's `model_answer` format;
# questions already answered are skipped, and a model with nothing left to answer is not even loaded.

# %%
if command in ("mt_bench", "pairwise"):
    run.answer(backend)

# %% [markdown]
# ### Matches
# FastChat's own match building: every model against the baseline (`pairwise-baseline`) or every pair
# (`pairwise-all`), turn 1 with pair-v2 and turn 2 with pair-v2-multi-turn; math, reasoning and coding with
# pair-math-v1 and the reference answer.

# %%
if command in ("mt_bench", "pairwise"):
    run.make_matches()

# %% [markdown]
# ### Judging
# Each match is judged in both answer orders (FastChat's g1 and g2). Verdicts are appended to
# `model_judgment/<judge>_pair.jsonl` as they arrive; matches judged before by the same judge under the same
# settings (endpoint, `--judge_max_tokens`, judge prompt) are not sent again. A request that fails after the
# client's bounded retries is recorded as a judge error, counted, never a tie. A verdict that could not be
# parsed was paid for and stays; `--retry_parse_failures` asks for those again.

# %%
if command in ("mt_bench", "pairwise"):
    todo, failures = run.judge()

# %% [markdown]
# ## Results
# Per model pair: win, loss, tie, judge errors, win rate and adjusted win rate ((win + 0.5 tie) / n) with a
# bootstrap 95% CI over questions, overall and per category.

# %%
if command in ("mt_bench", "pairwise"):
    pairs, results_file, chart = run.report()
    print(f"\nresults: {results_file}\nchart:   {chart}")
    show(chart)  # in a notebook: the win rates below this cell

# %% [markdown]
# ## AlpacaEval (alpaca_eval)
# Outputs for AlpacaEval's 805 instructions (or `--eval_set`) in its format, generated on `--backend` and kept
# across reruns; references from `--reference_outputs`, `--reference_model` or AlpacaEval 2's own; pairs
# annotated by the `alpaca_eval` package with `--annotators_config` at `--judge_base_url` (its caching, plus a
# log of every judge answer, so a rerun sends nothing twice); win rate, standard error and length-controlled
# win rate from its metrics. `leaderboard.csv`, `annotations.json`, `summary.json` and `win_rates.png` land in
# `<output_dir>/<config>/<reference>/` (see alignkit.evals.alpacaeval).

# %%
if command == "alpaca_eval":
    from alignkit.evals import alpacaeval

    summary = alpacaeval.run(settings, backend)
    show(summary["files"]["chart"])

# %% [markdown]
# ## The alignment tax (lm_eval)
# Each model loaded by alignkit's loader (adapters and chains included) and evaluated by lm-evaluation-harness on
# its own tasks and metrics (`--tasks`, plus YAML configs in `--include_path`); results kept per model, so a rerun
# evaluates only what changed. `results.md` (side by side), `results.json` and `results.png` in `--output_dir`
# (see alignkit.evals.harness). Needs `pip install 'alignkit[lm_eval]'`.

# %%
if command == "lm_eval":
    from alignkit.evals import harness

    lm_results, table_file, results_file, chart = harness.run(settings)
    print("\n" + table_file.read_text())
    print(f"results: {results_file}\nchart:   {chart}")
    show(chart)
