"""evaluate.py's machinery, as alignkit.feedback.labeling is label.py's: the commands and their settings, vibes, and the
pairwise flow (MT-Bench or your own prompts) from the judge to the results. AlpacaEval is alignkit.evals.alpacaeval.

The pairwise flow, one step each (see evaluate.py): `Pairwise.start` makes the judge first (a missing key stops
the run before any model loads) and checks the models; `load_questions`; `answer` (each model's answers, kept
across reruns under a key of its loader and sampling settings); `make_matches` (FastChat's own match building);
`judge` (verdicts appended as they arrive; matches judged before under the same judge settings are not sent
again); `report` (win / loss / tie and adjusted win rate with bootstrap CIs, as a table, JSON and a chart).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError, parse_config, redact
from alignkit.core.saved_settings import config_to_dict, save_config
from alignkit.core.config import (
    AlpacaEvalSettings, LMEvalSettings, MTBenchSettings, PairwiseSettings, VibesSettings,
)
from alignkit.core.digests import sample_seed
from alignkit.core.errors import UserError, run_again
from alignkit.core.groups import loader_settings
from alignkit.core.journal import hold
from alignkit.core.paths import check_writable
from alignkit.core.llm import EndpointSilent, FirstFailures
from alignkit.core.progress import Progress
from alignkit.evals.named_models import parse_models

COMMANDS = {
    "vibes": (VibesSettings, "a quick look at one model's answers, or two models side by side"),
    "mt_bench": (MTBenchSettings, "MT-Bench answers, judged pairwise by an OpenAI-compatible model via FastChat"),
    "pairwise": (PairwiseSettings, "the same pairwise flow on your own prompts (--preset tiny: offline demo)"),
    "alpaca_eval": (AlpacaEvalSettings, "AlpacaEval win rates (and length-controlled) through the alpaca_eval package"),
    "lm_eval": (LMEvalSettings, "lm-evaluation-harness tasks on a base model and its tuned versions, side by side"),
}
USAGE = "\n".join([f"usage: evaluate.py {{{','.join(COMMANDS)}}} [--OPTION VALUE ...]", ""]
                  + [f"  {name:<12}{text}" for name, (_, text) in COMMANDS.items()]
                  + ["", "A command's settings: python evaluate.py COMMAND --help"])


def parse_command(argv: list[str], command: str | None = None, overrides: dict | None = None):
    """(command, settings) from a command line `argv` (its first argument names the command), or from
    `command` and `overrides` in a notebook. `--help` alone prints the commands and exits."""
    from alignkit.modeling import presets

    argv = list(argv)
    if command is None:
        command = argv.pop(0) if argv and not argv[0].startswith("-") else None
    if command not in COMMANDS:
        if command is None and argv and argv[0] in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        import difflib

        close = difflib.get_close_matches(command or "", list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{'unknown command ' + repr(command) + hint if command else 'missing command'}: "
                          f"evaluate.py takes one of {', '.join(COMMANDS)} first (python evaluate.py --help says what "
                          "each does)")
    settings_class, description = COMMANDS[command]
    fields = {f.name for f in dataclasses.fields(settings_class) if f.init}
    named = {name: {k: v for k, v in d.items() if k in fields}  # each preset's share for this command
             for name, d in presets.named("evaluate").items()}
    if command == "alpaca_eval":  # its own share of the tiny preset: DPO against SFT as a reference model
        from alignkit.evals.alpacaeval import tiny_defaults

        named["tiny"] = tiny_defaults()
    if command == "lm_eval":  # the base and the tiny runs on the preset's local task (alignkit.evals.harness)
        from alignkit.evals.harness import tiny_defaults

        named = {"tiny": tiny_defaults()}
    settings = parse_config(settings_class, args=argv, presets=named if "preset" in fields else None,
                            overrides=overrides, prog=f"evaluate.py {command}", description=description)
    presets.ensure(settings)
    global _PARSED
    _PARSED = settings  # a notebook's settings cell run again: a pairwise run started earlier refuses its next step
    return command, settings


_PARSED = None  # the settings parse_command returned last (Pairwise's notebook checks)


# ---------------------------------------------------------------------------------------------------------
# vibes


def vibes(s, backend: str) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(prompts, models, {model: answers}): every prompt asked of `s.model_id` and `s.compare_to`, one model in
    memory at a time."""
    from alignkit.evals.prompts_file import prompt_questions
    from alignkit.modeling.generation import load_generator

    if s.output_file:  # checked before any answer: a folder there failed as the answers were saved, after generating
        if Path(s.output_file).is_dir():
            raise ConfigError(f"--output_file {s.output_file} is a folder: name a file (a .jsonl) for the answers")
        check_writable(Path(s.output_file).absolute().parent, "--output_file")
    prompts = list(s.prompts) + ([q["turns"][0] for q in prompt_questions(s.prompts_file)] if s.prompts_file else [])
    if not prompts:
        raise ConfigError('vibes needs prompts: --prompts "first prompt" "second prompt", or --prompts_file FILE')
    if dropped := len(prompts) - len(set(prompts)):  # asked once (its seed is its text's: the same answer again)
        prompts = list(dict.fromkeys(prompts))
        logger.info(f"vibes: {len(prompts)} prompts ({dropped} repeated ones dropped)")
    system = [{"role": "system", "content": s.system_prompt}] if s.system_prompt else []
    conversations = [system + [{"role": "user", "content": p}] for p in prompts]
    sources = [s.model_id] + ([s.compare_to] if s.compare_to else [])
    from alignkit.modeling.lineage import check_models
    from alignkit.modeling.model_folders import check_model_sources

    check_model_sources(s, sources)  # both there before the first answers (a mistyped --compare_to came after them)
    check_models(s, sources, "--model_id / --compare_to")  # and neither over a part retrained in place
    answers = {}
    for source in sources:
        with load_generator(loader_settings(s, source), backend) as generator, \
                Progress(f"{source}: answering", len(conversations), unit="prompt", errors=False) as progress:
            _AS_LOADED[source] = dict(generator.as_loaded)  # for save_vibes: `auto` as the loader resolved it
            answers[source] = generator(conversations, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                        top_p=s.top_p, num_beams=s.num_beams, batch_size=s.batch_size,
                                        seeds=[sample_seed(s.seed, p) for p in prompts], progress=progress)
    return prompts, sources, answers


def show_vibes(prompts: list[str], sources: list[str], answers: dict[str, list[str]]) -> None:
    """The answers printed side by side, one column per model, wrapped to the terminal."""
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


_AS_LOADED: dict[str, dict] = {}  # {model: how vibes last loaded it (backend, dtype, quantization)}


def save_vibes(s, prompts: list[str], sources: list[str], answers: dict[str, list[str]]) -> Path:
    """One JSON row per prompt in --output_file: its answers, each with how its model was loaded (the loader
    settings: dtype, quantization, chat template and its kwargs..., and `as_loaded`: what `auto` became), and the
    generation settings with the system prompt (a file made with one could not be told from one made without: the
    evaluate audit of session 31)."""
    output_file = Path(s.output_file or f"outputs/vibes-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    sampling = {k: getattr(s, k) for k in ("temperature", "top_p", "num_beams", "max_new_tokens", "seed",
                                           "system_prompt")}
    # As given (`auto` kept), and as the loader resolved it (`as_loaded`: auto's dtype is bf16 on a GPU, float32 here)
    loaded = {m: {**config_to_dict(loader_settings(s, m)), "as_loaded": _AS_LOADED.get(m, {})} for m in sources}
    with open(output_file, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            answers_i = [{"model_id": m, "answer": answers[m][i], "loaded_with": loaded[m]} for m in sources]
            f.write(json.dumps({"prompt": prompt, "answers": answers_i, "generation": sampling}) + "\n")
    return output_file


# ---------------------------------------------------------------------------------------------------------
# mt_bench and pairwise


@dataclass
class Pairwise:
    """One pairwise run (evaluate.py mt_bench or pairwise), filled in step by step."""

    command: str
    settings: object  # alignkit.core.config.MTBenchSettings or PairwiseSettings
    models: dict  # name -> model
    baseline: str
    use_rule: bool  # --judge_model rule (the preset's rule judge) or python:...: no endpoint
    client: object  # alignkit.core.llm.ChatClient, or None for the rule judge
    output_dir: Path
    questions: list = field(default_factory=list)
    references: dict = field(default_factory=dict)
    judge_prompts: dict | None = None
    answers: dict = field(default_factory=dict)
    matches: list = field(default_factory=list)
    identity: dict = field(default_factory=dict)
    judgment_file: Path | None = None
    failures: list = field(default_factory=list)
    # A notebook runs the steps as cells, in any order and again: each step needs the ones before it (STEPS), done in
    # this run, under the settings it started with; a step run again undoes the later ones. `running`: the step
    # started and not done, its cell stopped with an error (or interrupted), not a cell never run.
    done: list = field(default_factory=list)
    running: str | None = None
    started_under: dict = field(default_factory=dict)
    from_settings_cell: bool = False  # started with the settings parse_command (the settings cell) returned last

    STEPS = {"questions": "Questions", "answers": "Answers", "matches": "Matches", "judged": "Judging",
             "report": "Results"}

    def _step(self, step: str) -> None:
        """Refuse, in one line naming the cells to run, a step whose earlier steps have not run in this run, or
        run under other settings than it started with (the settings cell run again, or edited in place)."""
        now = config_to_dict(self.settings)
        changed = sorted(k for k in now.keys() | self.started_under.keys() if now.get(k) != self.started_under.get(k))
        if self.from_settings_cell and _PARSED is not self.settings or changed:
            what = f" ({', '.join(changed)})" if changed else ""
            raise UserError(f"the settings changed since 'The judge' cell started this {self.command} run{what}: run "
                            "the cells from 'The judge' on again")
        steps = list(self.STEPS)
        missing = [s for s in steps[:steps.index(step)] if s not in self.done]
        if missing and missing[0] == self.running:  # it ran and failed: "run it first" read as never run
            raise UserError(f"the '{self.STEPS[missing[0]]}' cell stopped with an error (see its line) or was "
                            "interrupted: fix that and run it again, then the cells below it in order")
        if missing:
            raise UserError(f"run the '{self.STEPS[missing[0]]}' cell first: the cells from 'The judge' on run in "
                            "order")
        self.done, self.running = steps[:steps.index(step)], step

    def _did(self, step: str) -> None:
        self.done.append(step)
        self.running = None

    @classmethod
    def start(cls, command: str, s) -> "Pairwise":
        """The files and the judge first, so a wrong path or a missing API key stops the run before any model is
        loaded; then the models."""
        from alignkit.core.llm import judge_client

        python = str(s.judge_model or "").startswith("python:")
        use_rule = s.judge_model == "rule" or python
        if use_rule and command == "mt_bench":
            raise ConfigError(f"--judge_model {s.judge_model} judges `evaluate.py pairwise` only: MT-Bench is judged "
                              "by an LLM with FastChat's prompts and reference answers (--judge_model NAME at "
                              "--judge_base_url)")
        if python:  # imported now: a missing file or function is one line before any model loads
            from alignkit.feedback.judge import PythonJudge

            PythonJudge(s.judge_model, "--judge_model")
        models = parse_models(s.models)
        baseline = s.baseline or next(iter(models))
        if baseline not in models:
            raise ConfigError(f"--baseline {baseline} is not one of the --models names: {', '.join(models)}")
        if len(models) < 2:
            raise ConfigError("pairwise judging needs at least two --models, e.g. base=ID dpo=PATH")
        # The files a later cell reads, before the judge's key: a wrong path was reported only once a key was set.
        if command == "pairwise" and s.prompts_file and not Path(s.prompts_file).is_file():
            raise ConfigError(f"--prompts_file {s.prompts_file} not found; check the path")
        if s.mt_bench_data and not use_rule:
            from alignkit.evals.mtbench import check_data_dir

            check_data_dir(s.mt_bench_data)
        client = None if use_rule else judge_client(s, what="the judge (--judge_api_key_env names the key's variable)")
        output_dir = Path(s.output_dir)
        check_writable(output_dir, "--output_dir")  # a file there: FileExistsError from the lock, a traceback
        # One run per folder: a second would generate the same answers and pay the judge for the same matches again.
        hold(output_dir / ".evaluate.lock", "evaluate.py", "let it finish, or pass another --output_dir")
        return cls(command, s, models, baseline, use_rule, client, output_dir,
                   started_under=copy.deepcopy(config_to_dict(s)), from_settings_cell=_PARSED is s)

    @property
    def judge_name(self) -> str:
        judge = self.settings.judge_model
        return judge if judge and judge.startswith("python:") else "rule" if self.use_rule else judge

    def load_questions(self) -> None:
        """MT-Bench's questions, judge prompts and reference answers (checked), or the prompts file's."""
        from alignkit.evals import fastchat_compat, mtbench
        from alignkit.evals.prompts_file import selected_prompts

        self._step("questions")
        s = self.settings
        common, _ = fastchat_compat.load()
        fastchat_compat.log_version()
        if self.command == "mt_bench":
            data = mtbench.data_dir(s.mt_bench_data)
            self.questions = mtbench.load_questions(data / mtbench.QUESTIONS, s.question_ids, s.max_questions)
            self.references = mtbench.load_reference_answers(data / mtbench.REFERENCES)
            mtbench.check_references(self.questions, self.references, common.NEED_REF_CATS, data / mtbench.REFERENCES)
        else:
            self.questions = selected_prompts(s.prompts_file, s.question_ids, s.max_questions)
            data = None if self.use_rule else mtbench.data_dir(s.mt_bench_data)  # for FastChat's pair-v2 prompt
        self.judge_prompts = None if self.use_rule else mtbench.load_judge_prompts(data / mtbench.JUDGE_PROMPTS)
        self._did("questions")

    def answer(self, backend: str) -> None:
        """Each model's answers, generated where missing; a model with nothing left to answer is not loaded."""
        from alignkit.evals import mtbench
        from alignkit.modeling.generation import load_generator
        from alignkit.modeling.lineage import check_models
        from alignkit.modeling.model_folders import check_model_sources

        self._step("answers")
        s = self.settings
        check_models(s, self.models.values())  # all of them before the first answers
        keys, parts, to_answer, refused = {}, {}, [], []
        for name, source in self.models.items():
            keys[name], parts[name] = mtbench.answers_key_and_settings(loader_settings(s, source), s, backend)
            path = mtbench.answer_path(self.output_dir, name)
            if s.answers_from:  # the same model's answers, made elsewhere under the same key
                mtbench.reuse_answers(path, s.answers_from, self.questions, name, source, keys[name], parts[name])
            try:
                answers = mtbench.read_answers(path, source, key=keys[name], settings=parts[name])
            except ConfigError as error:  # every model's kept answers checked: one rerun, not one per stale file
                refused.append((path, error))
                continue
            if mtbench.unanswered(self.questions, answers):
                to_answer.append(name)
        if refused:
            also = f" (refused too, each for its own reason: {', '.join(str(path) for path, _ in refused[1:])})" \
                if len(refused) > 1 else ""
            raise ConfigError(f"{refused[0][1]}{also}")
        check_model_sources(s, [self.models[name] for name in to_answer])  # each one to load is there, first
        # The folder's settings record, once its kept answers are this run's and its models are there: a refused run
        # left its settings beside answers made under others (audits of sessions 30 and 98: a mistyped model path).
        save_config(s, self.output_dir / "evaluate_config.json")  # secrets redacted
        same = {}
        for name, key in keys.items():  # a copy-paste slip: generation time and judge money for all ties
            same.setdefault(key, []).append(name)
        for names in (names for names in same.values() if len(names) > 1):
            logger.warning(f"{' and '.join(names)} are the same model as loaded, sampled alike: their answers are the "
                           "same, so their matches measure only the judge's position bias; pass each model once "
                           "unless that is the point")
        for name, source in self.models.items():
            path = mtbench.answer_path(self.output_dir, name)
            if name not in to_answer:
                print(f"{name}: all {len(self.questions)} questions already answered in {path}")
                continue
            with load_generator(loader_settings(s, source), backend) as generator:
                mtbench.generate_answers(generator, self.questions, name, source, path, s, keys[name], parts[name])
        self.answers = {name: mtbench.read_answers(mtbench.answer_path(self.output_dir, name), source, key=keys[name],
                                                  settings=parts[name]) for name, source in self.models.items()}
        self._did("answers")

    def make_matches(self) -> None:
        """FastChat's matches: every model against the baseline, or every pair; math, reasoning and coding
        questions of MT-Bench with the reference answers; first and second turns."""
        from alignkit.evals import fastchat_compat

        self._step("matches")
        s, names = self.settings, list(self.models)
        common, _ = fastchat_compat.load()
        if self.use_rule:
            # A python: judge by its spec, as in results.json (the table and FastChat's records said "rule")
            rule_judge = common.Judge(self.judge_name, {"name": "rule", "type": "pairwise", "output_format": "[[A]]"})
            self.matches = fastchat_compat.make_matches(self.questions, names, self.answers, rule_judge, s.mode,
                                                        self.baseline)
            self._did("matches")
            return
        judges = fastchat_compat.judges(s.judge_model, self.judge_prompts)
        refs = fastchat_compat.reference_answers_for(s.judge_model, self.references)
        need_ref = common.NEED_REF_CATS if self.command == "mt_bench" else []  # own prompts have no references
        plain = [q for q in self.questions if q["category"] not in need_ref]
        with_ref = [q for q in self.questions if q["category"] in need_ref]
        self.matches = []
        for group, judge, ref, multi_turn in [(plain, "default", None, False), (with_ref, "math", refs, False),
                                              (plain, "default-mt", None, True), (with_ref, "math-mt", refs, True)]:
            self.matches += fastchat_compat.make_matches(group, names, self.answers, judges[judge], s.mode,
                                                         self.baseline, ref_answers=ref, multi_turn=multi_turn)
        self._did("matches")

    def judge(self) -> tuple[list, list]:
        """Every match not settled before, in both answer orders; a failed request counts as a judge error.
        Returns (the matches sent this time, the requests that failed)."""
        from alignkit.evals import fastchat_compat, judgments
        from alignkit.modeling import presets

        self._step("judged")
        s = self.settings
        common, _ = fastchat_compat.load()
        rule_fn = None
        if str(s.judge_model).startswith("python:"):  # label.py's python: judges, their returns read as label.py does
            from alignkit.feedback.judge import PythonJudge

            rule_fn = PythonJudge(s.judge_model, "--judge_model").function
        elif self.use_rule:
            rule_fn = presets.judge(s.preset)  # the preset's rule (tiny's when none)
        # Who judges under which settings (endpoint, max_tokens, ...): a match judged under others is judged again.
        self.identity = judgments.judge_identity(rule=rule_fn) if self.use_rule else judgments.judge_identity(self.client)
        self.judgment_file = judgments.judgment_path(self.output_dir, self.judge_name)
        previous = judgments.read_judgments(self.judgment_file)
        todo = [m for m in self.matches if judgments.settled(m, previous, common.API_ERROR_OUTPUT, self.identity,
                                                           s.retry_parse_failures) is None]
        print(f"{len(self.matches)} matches, {len(self.matches) - len(todo)} judged before, {len(todo)} to judge "
              f"({'rule judge' if self.use_rule else f'{2 * len(todo)} requests to {s.judge_model}'})")

        fix = "Check that the server at --judge_base_url is up (the URL usually ends in /v1), and --judge_model"
        watch = FirstFailures("judge request", fix, 2 * len(todo))  # a dead server stops the run at its 5th failure

        def on_error(error):
            if isinstance(error, EndpointSilent):  # its own line, raised: no "failed after retries" before it
                raise error
            self.failures.append(error)
            logger.warning(f"judge request failed after {s.max_retries} retries: {type(error).__name__}: "
                           f"{redact(str(error))}")
            watch.failed(error)

        if self.use_rule:
            play = judgments.rule_player(judgments.read_verdicts(rule_fn), self.judge_name)
            judgments.judge_matches(todo, play, self.judgment_file, self.identity, s.parallel)
        elif todo:
            kept = judgments.answers_path(self.judgment_file)  # each paid answer, before its match's verdict
            with fastchat_compat.judging_with(self.client, on_error=on_error, on_success=watch.ok, kept=kept,
                                              reuse=not s.retry_parse_failures):
                judgments.judge_matches(todo, fastchat_compat.play, self.judgment_file, self.identity, s.parallel)
        if self.failures and len(self.failures) >= 2 * len(todo):  # every request: no result, not an empty table
            first = self.failures[0]
            raise UserError(f"all {len(self.failures)} judge requests failed ({type(first).__name__}: "
                            f"{' '.join(redact(str(first)).split())[:200]}). {fix}, then {run_again()} "
                            "(the answers are kept)")
        if self.failures:
            print(f"{len(self.failures)} judge requests failed; a rerun sends their matches again")
        self._did("judged")
        return todo, self.failures

    def report(self) -> tuple[list[dict], Path, Path]:
        """Print the results table; write results.json and results.png. Returns (per pair results, their paths)."""
        from alignkit.evals import judgments, results

        self._step("report")
        s = self.settings
        judged = judgments.read_judgments(self.judgment_file)
        records = [judged[key] for key in (judgments.match_key(m, self.identity) for m in self.matches) if key in judged]
        if not records:  # results.json and results.png keep the last run's table
            raise UserError(f"no verdicts of this run's {len(self.matches)} matches in {self.judgment_file}, so no "
                            "table: results.json and results.png are left as they were (in a notebook, run the "
                            "'Judging' cell first)")
        # The file FastChat reads: one verdict a match. Verdicts of these settings made before come back from the
        # archive: nothing was judged again (it said "12 earlier verdicts of matches judged again moved" of them).
        moved, restored = judgments.retire_replaced(self.judgment_file, records)
        archive = judgments.archive_path(self.judgment_file)
        if restored:
            print(f"{restored} verdicts made before under these judge settings taken back from {archive}"
                  f"{f'; the {moved} they replace (other settings or answers) moved there' if moved else ''}")
        elif moved:
            print(f"{moved} earlier verdicts of matches judged again moved to {archive}")
        self.say_unparsed(records)
        categories = {q["question_id"]: q["category"] for q in self.questions}
        pairs = results.pair_results(records, categories, s.bootstrap_rounds, s.seed)
        print(results.format_table(pairs))
        totals = results.model_totals(records) if s.mode == "pairwise-all" else None
        if totals:
            print("\n" + results.format_totals(totals))
        results_file = results.save_json(
            pairs, self.output_dir / "results.json", command=self.command, judge=self.judge_name, mode=s.mode,
            baseline=self.baseline if s.mode == "pairwise-baseline" else None, models=self.models,
            questions=[q["question_id"] for q in self.questions], judgment_file=str(self.judgment_file),
            judge_usage=self.client.usage.as_dict() if self.client else None, settings=config_to_dict(s),
            **({"model_totals": totals} if totals else {}),
        )
        self.record(pairs, totals)
        return pairs, results_file, results.plot(pairs, self.output_dir / "results.png")

    def say_unparsed(self, records: list[dict]) -> None:
        """Verdicts the judge wrote but FastChat could not parse (no [[A]], [[B]] or [[C]]): counted as errors in the
        table; one example is shown, and a judge that never gave one is a failed run, not a table of errors."""
        from alignkit.evals import fastchat_compat

        error_output = fastchat_compat.load()[0].API_ERROR_OUTPUT
        answers = [(r.get(f"{g}_winner"), r.get(f"{g}_judgment")) for r in records for g in ("g1", "g2")]
        unparsed = [text for winner, text in answers if winner == "error" and text != error_output]
        if not unparsed or self.use_rule:
            return
        example = " ".join(str(unparsed[-1]).split())
        example = repr(example if len(example) <= 160 else f"...{example[-160:]}")  # the verdict ends the answer
        fix = ("use a judge model that ends its answer with [[A]], [[B]] or [[C]] as FastChat's prompt asks (or a "
               "larger --judge_max_tokens if answers were cut off), then rerun with --retry_parse_failures true")
        if len(unparsed) == len(answers):
            raise UserError(f"the judge gave no verdict FastChat can parse in any of its {len(answers)} answers "
                            f"(the last ended {example}): {fix}")
        print(f"{len(unparsed)} of {len(answers)} judge answers had no verdict FastChat can parse (counted as "
              f"errors), e.g. one ending {example}; --retry_parse_failures true asks again")

    def record(self, pairs: list[dict], totals: list[dict] | None = None) -> None:
        """Each evaluated local model folder keeps its win rates, for its model card (alignkit.core.card); in
        pairwise-all, each model's rate over all its matches too (the model_2 of every pair included)."""
        from alignkit.core.card import record_evaluation

        benchmark, dataset = ("MT-Bench", "mt_bench") if self.command == "mt_bench" else ("pairwise prompts", "custom")
        unit = "judged matches"  # MT-Bench: a question's every turn; an error is not counted
        for total in totals or []:
            if total["model"] in self.models:
                record_evaluation(self.models[total["model"]], f"{self.command} vs all", {
                    "benchmark": benchmark, "dataset": dataset, "metric": "win_rate",
                    "value": total["adjusted_win_rate"],
                    "metric_name": f"adjusted win rate over all {len(self.models)} models (judge {self.judge_name})"})
        for pair in pairs:
            rate, n = pair["overall"]["adjusted_win_rate"], pair["overall"].get("n")
            if rate is None:
                continue
            # Both sides (ties count half: the opponent's rate is the rest), so a later comparison of a pair leaves
            # no side's older figure standing; how many it rests on, so a --max_questions 3 run says so.
            for model, opponent, value in ((pair["model"], pair["opponent"], rate),
                                           (pair["opponent"], pair["model"], 1 - rate)):
                if model in self.models:
                    record_evaluation(self.models[model], f"{self.command} vs {opponent}", {
                        "benchmark": benchmark, "dataset": dataset, "metric": "win_rate", "value": value,
                        "metric_name": f"adjusted win rate vs {opponent}{f' over {n} {unit}' if n else ''} "
                                       f"(judge {pair['judge']})"})
