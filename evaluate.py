# %% [markdown]
# # Evaluate: vibes, MT-Bench pairwise judging through FastChat, AlpacaEval through alpaca_eval
#
# Four commands, each with its own settings (`python evaluate.py COMMAND --help`):
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
# ```
#
# Everything lands in `--output_dir` in FastChat's layout (`model_answer/`, `model_judgment/`), and a rerun
# picks up where the last run stopped: answered questions are not generated again, judged matches are not
# sent again (a match whose judge request failed is).

# %% [markdown]
# ## Command and settings
# The first argument names the command; the rest are its settings: defaults < `--preset` < `.env` <
# environment < `--config recipe.yaml` < flags < `overrides`. In a notebook, set `NOTEBOOK_COMMAND` and
# `overrides` below (or environment variables, COMMAND for the command) instead of touching argv.

# %%
import dataclasses
import os
import sys

from alignkit.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit import presets
from alignkit.args import ConfigError, is_notebook, parse_config
from alignkit.config import AlpacaEvalSettings, MTBenchSettings, PairwiseSettings, VibesSettings, loader_settings

# In a notebook, set things here instead of on a command line, e.g. NOTEBOOK_COMMAND = "pairwise" and
# overrides = {"preset": "tiny"}; environment variables (upper-case names, COMMAND for the command) work too.
NOTEBOOK_COMMAND: str = os.environ.get("COMMAND", "vibes")
overrides: dict = {}

COMMANDS = {
    "vibes": (VibesSettings, "a quick look at one model's answers, or two models side by side"),
    "mt_bench": (MTBenchSettings, "MT-Bench answers, judged pairwise by an OpenAI-compatible model via FastChat"),
    "pairwise": (PairwiseSettings, "the same pairwise flow on your own prompts (--preset tiny: offline demo)"),
    "alpaca_eval": (AlpacaEvalSettings, "AlpacaEval win rates (and length-controlled) through the alpaca_eval package"),
}
USAGE = "\n".join([f"usage: evaluate.py {{{','.join(COMMANDS)}}} [--OPTION VALUE ...]", ""]
                  + [f"  {name:<12}{text}" for name, (_, text) in COMMANDS.items()]
                  + ["", "A command's settings: python evaluate.py COMMAND --help"])

argv = [] if is_notebook() else sys.argv[1:]
command = NOTEBOOK_COMMAND if is_notebook() else argv.pop(0) if argv and not argv[0].startswith("-") else None
if command not in COMMANDS:
    if command is None and argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0)
    raise ConfigError(f"{'unknown command ' + repr(command) if command else 'missing command'}\n{USAGE}")
settings_class, description = COMMANDS[command]
fields = {f.name for f in dataclasses.fields(settings_class) if f.init}


def whole_values(argv: list[str], flag: str) -> tuple[list[str], list[str] | None]:
    """(argv without `flag`, its values kept whole). alignkit.args splits list values at commas, and prompts
    hold commas: "Hello, who are you?" is one prompt."""
    rest, values, i = [], None, 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        i += 1
        if name != flag:
            rest.append(argv[i - 1])
            continue
        values = (values or []) + ([inline] if eq else [])
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values, i = values + [argv[i]], i + 1
    return rest, values


argv, prompts = whole_values(argv, "--prompts") if "prompts" in fields else (argv, None)
named = {name: {k: v for k, v in d.items() if k in fields}  # each preset's share for this command
         for name, d in presets.named("evaluate").items()}
if command == "alpaca_eval":  # its own share of the tiny preset: DPO against SFT as a reference model
    from alignkit.alpacaeval import tiny_defaults

    named["tiny"] = tiny_defaults()
settings = parse_config(settings_class, args=argv, presets=named if "preset" in fields else None,
                        overrides={**overrides, **({"prompts": prompts} if prompts is not None else {})},
                        prog=f"evaluate.py {command}", description=description)
presets.ensure(settings)
# The engine every model answers on, chosen once: --backend vllm without vLLM stops here, before any work.
from alignkit.generation import load_generator, resolve_backend

backend = resolve_backend(settings.backend, settings.num_beams)

# %% [markdown]
# ## Vibes
# Batched generation through each model's chat template with the generation prompt (left padding, so a
# batch answers at once). Base models, adapters (chains included) and merged folders all load the same way;
# on `--backend vllm`, a base model or one adapter on it (merge a chain first).

# %%
if command == "vibes":
    import json
    import shutil
    import textwrap
    import time
    from pathlib import Path

    from alignkit.mtbench import prompt_questions

    prompts = list(settings.prompts) + (
        [q["turns"][0] for q in prompt_questions(settings.prompts_file)] if settings.prompts_file else [])
    if not prompts:
        raise ConfigError('vibes needs prompts: --prompts "first prompt" "second prompt", or --prompts_file FILE')
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    conversations = [system + [{"role": "user", "content": p}] for p in prompts]
    sources = [settings.model_id] + ([settings.compare_to] if settings.compare_to else [])
    answers = {}
    for source in sources:  # one model in memory at a time
        with load_generator(loader_settings(settings, source), backend) as generator:
            answers[source] = generator(
                conversations, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p, num_beams=settings.num_beams, batch_size=settings.batch_size, seed=settings.seed,
            )

# %% [markdown]
# Printed side by side, and written to `--output_file` (one JSON row per prompt).

# %%
if command == "vibes":
    width = max(40, min(shutil.get_terminal_size((120, 20)).columns, 160))
    column = (width - 3 * (len(sources) - 1)) // len(sources)

    def block(text: str) -> list[str]:
        return [line for para in (text or "(empty answer)").splitlines() or [""]
                for line in textwrap.wrap(para, column) or [""]]

    for prompt, *outs in zip(prompts, *(answers[s] for s in sources)):
        print("=" * width + "\n" + "\n".join(textwrap.wrap(f">>> {prompt}", width)))
        columns = [[s[-column:]] + ["-" * min(column, len(s))] + block(o) for s, o in zip(sources, outs)]
        for row in zip(*(c + [""] * (max(map(len, columns)) - len(c)) for c in columns)):
            print(" | ".join(cell.ljust(column) for cell in row).rstrip())
    output_file = Path(settings.output_file or f"outputs/vibes-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    sampling = {k: getattr(settings, k) for k in ("temperature", "top_p", "num_beams", "max_new_tokens", "seed")}
    with open(output_file, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            answers_i = [{"model_id": s, "answer": answers[s][i]} for s in sources]
            f.write(json.dumps({"prompt": prompt, "answers": answers_i, "generation": sampling}) + "\n")
    print(f"\n{len(prompts)} prompts; answers written to {output_file}")

# %% [markdown]
# ## Pairwise judging (mt_bench, pairwise)
# ### The judge
# Created first, so a missing API key stops the run before any model is loaded: the key comes from
# `--judge_api_key_env` (default OPENAI_API_KEY, also read from `.env`); a `--judge_base_url` server may need
# none. `--judge_model rule` (pairwise only) is the tiny preset's rule judge and calls nothing.

# %%
if command in ("mt_bench", "pairwise"):
    from pathlib import Path

    from alignkit import fastchat_compat, logger, mtbench
    from alignkit.args import ConfigError, redact, save_config
    from alignkit.llm import judge_client

    use_rule = settings.judge_model == "rule"
    if use_rule and command == "mt_bench":
        raise ConfigError("--judge_model rule is the tiny preset's rule judge, for `evaluate.py pairwise` only")
    models = mtbench.parse_models(settings.models)
    baseline = settings.baseline or next(iter(models))
    if baseline not in models:
        raise ConfigError(f"--baseline {baseline} is not one of the --models names: {', '.join(models)}")
    if len(models) < 2:
        raise ConfigError("pairwise judging needs at least two --models, e.g. base=ID dpo=PATH")
    client = None
    if not use_rule:
        client = judge_client(settings, what="the judge (--judge_api_key_env names the key's variable)")
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(settings, output_dir / "evaluate_config.json")  # secrets redacted

# %% [markdown]
# ### Questions
# MT-Bench: FastChat's `question.jsonl`, judge prompts and GPT-4 reference answers (math, reasoning, coding
# are judged against them). `pairwise`: your prompts file, one turn each.

# %%
if command in ("mt_bench", "pairwise"):
    common, _ = fastchat_compat.load()
    fastchat_compat.log_version()
    if command == "mt_bench":
        data = mtbench.data_dir(settings.mt_bench_data)
        questions = mtbench.load_questions(data / mtbench.QUESTIONS, settings.question_ids, settings.max_questions)
        references = mtbench.load_reference_answers(data / mtbench.REFERENCES)
        mtbench.check_references(questions, references, common.NEED_REF_CATS, data / mtbench.REFERENCES)
    else:
        questions = mtbench.select(mtbench.prompt_questions(settings.prompts_file), settings.question_ids,
                                   settings.max_questions, settings.prompts_file)
        references = {}
        data = None if use_rule else mtbench.data_dir(settings.mt_bench_data)  # for FastChat's pair-v2 prompt
    judge_prompts = None if use_rule else mtbench.load_judge_prompts(data / mtbench.JUDGE_PROMPTS)
    print(f"{len(questions)} questions, {len(models)} models: {', '.join(f'{n}={s}' for n, s in models.items())}")

# %% [markdown]
# ### Answers
# Our own generation, not FastChat's gen_model_answer (which hard-codes CUDA and FastChat's own prompt
# templates): each model's chat template, every turn asked with the conversation so far. Temperature: FastChat's
# per-category MT-Bench values unless `--temperature` is given. Written in FastChat's `model_answer` format;
# questions already answered are skipped, and a model with nothing left to answer is not even loaded.

# %%
if command in ("mt_bench", "pairwise"):
    from alignkit.config import loader_settings

    keys = {name: mtbench.answers_key(loader_settings(settings, source), settings, backend)
            for name, source in models.items()}
    for name, source in models.items():
        path = mtbench.answer_path(output_dir, name)
        if not mtbench.unanswered(questions, mtbench.read_answers(path, source, key=keys[name])):
            print(f"{name}: all {len(questions)} questions already answered in {path}")
            continue
        if getattr(settings, "preset", None) == "tiny" and not Path(source).exists():
            raise ConfigError(f"{source} not found: train the tiny runs first (python sft.py --preset tiny; python "
                              "dpo.py --preset tiny --model_id runs/tiny-sft), or pass --models NAME=PATH ...")
        if getattr(settings, "preset", None) == "smol" and not Path(source).exists():
            raise ConfigError(f"{source} not found: train it first (python label.py --preset smol; python dpo.py "
                              "--preset smol), or pass --models NAME=PATH ...")
        with load_generator(loader_settings(settings, source), backend) as generator:
            mtbench.generate_answers(generator, questions, name, source, path, settings, keys[name])
    answers = {name: mtbench.read_answers(mtbench.answer_path(output_dir, name), source, key=keys[name])
               for name, source in models.items()}

# %% [markdown]
# ### Matches
# FastChat's own match building: every model against the baseline (`pairwise-baseline`) or every pair
# (`pairwise-all`), turn 1 with pair-v2 and turn 2 with pair-v2-multi-turn; math, reasoning and coding with
# pair-math-v1 and the reference answer.

# %%
if command in ("mt_bench", "pairwise"):
    names = list(models)
    if use_rule:
        rule_judge = common.Judge("rule", {"name": "rule", "type": "pairwise", "output_format": "[[A]]"})
        matches = fastchat_compat.make_matches(questions, names, answers, rule_judge, settings.mode, baseline)
    else:
        judges = fastchat_compat.judges(settings.judge_model, judge_prompts)
        refs = fastchat_compat.reference_answers_for(settings.judge_model, references)
        need_ref = common.NEED_REF_CATS if command == "mt_bench" else []  # own prompts have no references
        plain = [q for q in questions if q["category"] not in need_ref]
        with_ref = [q for q in questions if q["category"] in need_ref]
        matches = []
        for group, judge, ref, multi_turn in [(plain, "default", None, False), (with_ref, "math", refs, False),
                                              (plain, "default-mt", None, True), (with_ref, "math-mt", refs, True)]:
            matches += fastchat_compat.make_matches(group, names, answers, judges[judge], settings.mode, baseline,
                                                    ref_answers=ref, multi_turn=multi_turn)

# %% [markdown]
# ### Judging
# Each match is judged in both answer orders (FastChat's g1 and g2). Verdicts are appended to
# `model_judgment/<judge>_pair.jsonl` as they arrive; matches judged before by the same judge under the same
# settings (endpoint, `--judge_max_tokens`, judge prompt) are not sent again. A request that fails after the
# client's bounded retries is recorded as a judge error, counted, never a tie. A verdict that could not be
# parsed was paid for and stays; `--retry_parse_failures` asks for those again.

# %%
if command in ("mt_bench", "pairwise"):
    judge_name = "rule" if use_rule else settings.judge_model
    # Who judges under which settings (endpoint, max_tokens, ...): a match judged under others is judged again.
    rule_fn = presets.judge(settings.preset) if use_rule else None  # the preset's rule (tiny's when none)
    identity = mtbench.judge_identity(rule=rule_fn) if use_rule else mtbench.judge_identity(client)
    judgment_file = mtbench.judgment_path(output_dir, judge_name)
    previous = mtbench.read_judgments(judgment_file)
    todo = [m for m in matches if mtbench.settled(m, previous, common.API_ERROR_OUTPUT, identity,
                                                  settings.retry_parse_failures) is None]
    print(f"{len(matches)} matches, {len(matches) - len(todo)} judged before, {len(todo)} to judge "
          f"({'rule judge' if use_rule else f'{2 * len(todo)} requests to {settings.judge_model}'})")
    failures = []

    def on_error(error):
        failures.append(error)
        logger.warning(f"judge request failed after {settings.max_retries} retries: {type(error).__name__}: "
                       f"{redact(str(error))}")

    if use_rule:
        mtbench.judge_matches(todo, mtbench.rule_player(rule_fn), judgment_file, identity, settings.parallel)
    elif todo:
        with fastchat_compat.judging_with(client, on_error=on_error):
            mtbench.judge_matches(todo, fastchat_compat.play, judgment_file, identity, settings.parallel)
    if failures:
        print(f"{len(failures)} judge requests failed; a rerun sends their matches again")

# %% [markdown]
# ## Results
# Per model pair: win, loss, tie, judge errors, win rate and adjusted win rate ((win + 0.5 tie) / n) with a
# bootstrap 95% CI over questions, overall and per category.

# %%
if command in ("mt_bench", "pairwise"):
    from alignkit import results
    from alignkit.args import config_to_dict

    judged = mtbench.read_judgments(judgment_file)
    records = [judged[key] for key in (mtbench.match_key(m, identity) for m in matches) if key in judged]
    categories = {q["question_id"]: q["category"] for q in questions}
    pairs = results.pair_results(records, categories, settings.bootstrap_rounds, settings.seed)
    print(results.format_table(pairs))
    results_file = results.save_json(
        pairs, output_dir / "results.json", command=command, judge=judge_name, mode=settings.mode,
        baseline=baseline if settings.mode == "pairwise-baseline" else None, models=models,
        questions=[q["question_id"] for q in questions], judgment_file=str(judgment_file),
        judge_usage=client.usage.as_dict() if client else None, settings=config_to_dict(settings),
    )
    chart = results.plot(pairs, output_dir / "results.png")
    print(f"\nresults: {results_file}\nchart:   {chart}")

# %% [markdown]
# ## AlpacaEval (alpaca_eval)
# Outputs for AlpacaEval's 805 instructions (or `--eval_set`) in its format, generated on `--backend` and kept
# across reruns; references from `--reference_outputs`, `--reference_model` or AlpacaEval 2's own; pairs
# annotated by the `alpaca_eval` package with `--annotators_config` at `--judge_base_url` (its caching, plus a
# log of every judge answer, so a rerun sends nothing twice); win rate, standard error and length-controlled
# win rate from its metrics. `leaderboard.csv`, `annotations.json`, `summary.json` and `win_rates.png` land in
# `<output_dir>/<config>/<reference>/` (see alignkit.alpacaeval).

# %%
if command == "alpaca_eval":
    from alignkit import alpacaeval

    summary = alpacaeval.run(settings, backend)
