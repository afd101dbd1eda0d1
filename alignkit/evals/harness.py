"""evaluate.py lm_eval: the alignment tax, measured by EleutherAI's lm-evaluation-harness (the `lm_eval` package).

Each model of `--models NAME=SOURCE` (a base, an adapter folder (chains included), a merged folder, a GGUF file) is
loaded once by alignkit's loader, as every other script loads it, and handed to lm_eval's own HF model class
(`HFLM(pretrained=<the loaded model>)`); the tasks are lm_eval's own configs and metrics (IFEval, GSM8K, MMLU, ...,
`--tasks`), plus any YAML task configs in `--include_path` (e.g. a task over local files). Nothing of lm_eval is
copied here. The numbers land side by side: `results.md` (a table: a row per task and metric, a column per
model, with lm_eval's standard errors), `results.json` (lm_eval's results of each model, as it gives them) and
`results.png` (a grouped bar chart; alignkit.evals.harness_report), the first two saying what they were made under
(`--limit`, few-shot and whether as turns, chat template, system instruction, gen_kwargs, bootstrap_iters, seed,
lm_eval's version) and by which models as loaded. Each model's results
are kept in `<output_dir>/models/NAME.json` under a key of its source, loader settings and the harness settings,
one entry per key, so a rerun evaluates only what changed and a quick `--limit` run leaves the full results
standing.

The tiny preset defines its own local tasks (`tiny_task`): `tiny_rule` (does the model prefer the rule-following
answer: the preference) and `tiny_text` (the perplexity of held-out text of the base's own distribution: the tax).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.digests import digest
from alignkit.core.errors import UserError
from alignkit.core.journal import read_json, write_atomic
from alignkit.evals.harness_report import describe, describe_models, format_table, plot

INSTALL = "pip install 'alignkit[lm_eval]' (or pip install 'lm_eval>=0.4.13,<0.5')"
TINY_TASKS = ("tiny_rule", "tiny_text")
KEPT_PER_MODEL = 8  # results kept per model name, one per settings key, the oldest dropped first


def require():
    """The lm_eval package, or one UserError line naming the install command."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - its HF backend is what runs here
    except ImportError as e:
        raise UserError(f"evaluate.py lm_eval needs EleutherAI's lm-evaluation-harness ({e}): {INSTALL}") from None
    return lm_eval


# ---------------------------------------------------------------------------------------------------------
# The tiny preset's local task


def tiny_defaults() -> dict:
    """`evaluate.py lm_eval --preset tiny`: the base model and the tiny runs on the preset's local task."""
    from alignkit.modeling import presets

    return dict(models=[f"base={presets.paths()['model']}", "sft=runs/tiny-sft", "dpo=runs/tiny-dpo"],
                tasks=list(TINY_TASKS), include_path=str(presets.tiny_dir() / "lm_eval_tasks"), quantization="none",
                num_threads="1", batch_size=32, output_dir="outputs/lm_eval-tiny")


def tiny_task(folder, n: int = 200, seed: int = 1) -> Path:
    """Write the tiny preset's two tasks as lm_eval YAML configs over local JSONL files in `folder` (rewritten only
    when missing, so a rerun reads the same files), from fresh data of the preset (seeds other than its own):

    - `tiny_rule` (the preference): n prompts, each with a rule-following answer and one with a single
      off-category word; multiple choice, lm_eval's `acc`;
    - `tiny_text` (the tax): n chat transcripts of the preset's pretraining distribution (each answer word on topic
      half of the time), scored by lm_eval's rolling log-likelihood: `word_perplexity` and `bits_per_byte`, lower
      is better. A tuned model that keeps the base's language stays near the base; one that lost it rises."""
    import random

    from alignkit.modeling import presets

    folder = Path(folder)
    if all((folder / f"{name}.{ext}").is_file() for name in TINY_TASKS for ext in ("jsonl", "yaml")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rule = []
    for _ in range(n):
        category, prompt = presets._prompt(rng)
        good = presets._answer(rng, category, 1.0, n_wrong=0)
        bad = presets._answer(rng, category, 0.0, n_wrong=1)
        rule.append({"prompt": prompt, "choices": [good, bad], "label": 0})
    text = [{"text": presets._render(row["messages"])} for row in presets.make_data(seed + 1)["pretrain"][:n]]
    # lm_eval's own task schema. The tiny tokenizer has no space-prefixed words, so an answer follows its prompt
    # with no delimiter.
    configs = {
        "tiny_rule": (rule, """output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""),
        "tiny_text": (text, """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""),
    }
    for name, (rows, body) in configs.items():
        data = folder / f"{name}.jsonl"
        write_atomic(data, "".join(json.dumps(row) + "\n" for row in rows))  # reused by a rerun: never half a file
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {json.dumps(str(data.resolve()))}\ntest_split: test\n")
        write_atomic(folder / f"{name}.yaml", head + body)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Running the harness


def _key(s, source: str) -> str:
    """What a model's kept results depend on: the model as loaded (alignkit.modeling.identity: every loader setting,
    every file down its adapter chain, the GGUF file, the hardware), the tasks with the content of every file of
    --include_path, lm_eval's version and the evaluation settings. A model retrained in place is evaluated again."""
    from alignkit.core.groups import loader_settings
    from alignkit.modeling.identity import file_hashes, model_identity

    task_files = sorted(p for p in Path(s.include_path).rglob("*") if p.is_file()) if s.include_path else []
    task_files += [p for p in task_data(task_files) if p not in task_files]  # rows a task reads from elsewhere
    settings = {k: v for k, v in harness_settings(s).items() if v not in _AS_BEFORE.get(k, ())}
    parts = {"model": model_identity(loader_settings(s, source), "transformers"),
             "task_files": {str(p): h for p, h in file_hashes(task_files).items()}, **settings}
    return digest(parts, 16, ensure_ascii=True)


# Harness settings added since results were first kept, at the value every earlier run had (lm_eval's defaults):
# there they leave the key as it was, so results kept before are reused, not evaluated again.
_AS_BEFORE = {"fewshot_as_multiturn": (True, None), "system_instruction": (None,), "gen_kwargs": (None,),
              "bootstrap_iters": (100000,)}


def task_data(task_files: list[Path]) -> list[Path]:
    """The local files the task YAMLs among `task_files` read their rows from (`dataset_path`, and
    `dataset_kwargs`' `data_files` or `data_dir`), which may lie outside --include_path: a path as lm_eval reads it,
    from the folder it runs in (a relative one is not looked for beside the YAML; load_tasks says so where it is
    there)."""
    found: list[Path] = []
    for _, text in _data_paths(task_files):
        if (path := Path(text).expanduser()).exists():
            found += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return found


def _data_paths(task_files: list[Path]) -> list[tuple[Path, str]]:
    """(YAML, path as written) for every data path of the task YAMLs among `task_files`. lm_eval's own tags
    (`!function`) are read as nothing; a YAML that does not parse is lm_eval's to report."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    found = []
    for file in (f for f in task_files if f.suffix in (".yaml", ".yml")):
        try:
            config = yaml.load(file.read_text(encoding="utf-8"), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        if not isinstance(config, dict):
            continue
        kwargs = config.get("dataset_kwargs") if isinstance(config.get("dataset_kwargs"), dict) else {}
        found += [(file, text) for text in _strings([config.get("dataset_path"), kwargs.get("data_files"),
                                                     kwargs.get("data_dir")])]
    return found


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [text for item in value for text in _strings(item)] if isinstance(value, list) else []


def _beside_yaml(s, missing: str) -> Path | None:
    """The task YAML beside which a data path lm_eval did not find lies (it reads one from the folder it runs in)."""
    files = sorted(p for p in Path(s.include_path).rglob("*") if p.is_file()) if s.include_path else []
    for file, text in _data_paths(files):
        if Path(text).expanduser().resolve() == Path(missing).resolve() and (file.parent / text).exists():
            return file
    return None


def load_tasks(s, task_manager) -> list:
    """Each task of --tasks with its data, read before any model loads: a Hub dataset out of reach (offline, gated)
    or a task's data file that is not where lm_eval looks ended in lm_eval's traceback after the first model had
    loaded (the evaluate audit of session 31). One line instead, naming the task, what failed and the fix; an error
    of another kind (a bug in a task's own code) keeps its traceback. The tasks are built under --seed, as
    simple_evaluate seeds before it builds them (GPQA's process_docs shuffles the choices with `random`). Returns
    what simple_evaluate takes for --tasks: the Task or Group built here (the first model's run reads no data
    again), or the name where it is a tag of several tasks."""
    import random

    import numpy as np
    import torch

    out = []
    from alignkit.core.sources import cache_alone_if_hub_silent

    with cache_alone_if_hub_silent("lm_eval's tasks read their data"):
        for name in s.tasks:
            random.seed(s.seed)  # as simple_evaluate seeds (random_seed, numpy_random_seed, torch_random_seed)
            np.random.seed(s.seed)
            torch.manual_seed(s.seed)
            try:
                loaded = task_manager.load([name])
            except Exception as error:
                if (said := _no_data(s, name, error)) is None:
                    raise
                raise ConfigError(said) from None
            out.append(loaded["groups"].get(name) or loaded["tasks"].get(name) or name)
    return out


def _no_data(s, task: str, error: BaseException) -> str | None:
    """Why lm_eval could not read a task's data, with the fix, in one line; None for an error of another kind."""
    import re

    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = next((str(e).strip().splitlines()[0] for e in chain if str(e).strip()), type(error).__name__)
    names = {type(e).__name__ for e in chain}
    head = f"lm_eval task {task!r}: its data did not load ({type(error).__name__}: {said[:240]})"
    quoted = re.findall(r"'([^'\s]+)'", said)  # the path or id the error names ("Couldn't reach 'data' on ...")
    yaml_file = next((found for text in quoted if (found := _beside_yaml(s, text))), None)

    def relative(yaml_file: Path) -> str:
        return (f"{head}: lm_eval reads a task's data_files and dataset_path from the folder it runs in "
                f"({Path.cwd()}), not from the YAML's (it is beside {yaml_file}); write them as absolute paths, or "
                "run from the folder they are relative to")

    if isinstance(error, ModuleNotFoundError) and error.name:
        return (f"lm_eval task {task!r} needs the module {error.name}, not installed: pip install {error.name} (or "
                "the lm_eval extra that names the task, e.g. pip install 'lm_eval[ifeval]')")
    if "DatasetNotFoundError" in names and "gated" in said.lower():
        return (f"{head}: a gated dataset: accept its terms on its Hub page, then log in (huggingface-cli login, or "
                "HF_TOKEN)")
    if names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                "HfHubHTTPError", "ConnectTimeout", "ReadTimeout", "MaxRetryError"}:
        if yaml_file:  # a folder beside the YAML, taken for a Hub id
            return relative(yaml_file)
        if "DatasetNotFoundError" in names and "OfflineModeIsEnabled" not in said:
            return f"{head}: no such dataset on the Hub (or a private one): check the task's dataset_path"
        return (f"{head}: its dataset is on the Hugging Face Hub, out of reach here (offline, or HF_HUB_OFFLINE=1 / "
                "HF_DATASETS_OFFLINE=1); load it once where the Hub is reachable into this machine's Hugging Face "
                "cache (HF_HOME), or give the task local data: a YAML in --include_path with dataset_path: json and "
                "data_files")
    if isinstance(error, FileNotFoundError) or "FileNotFoundError" in names:
        if yaml_file:
            return relative(yaml_file)
        return f"{head}: check the task's data_files and dataset_path (a relative path is read from {Path.cwd()})"
    return None


def evaluate_model(s, source: str, lm_eval, task_manager, tasks: list | None = None) -> dict:
    """lm_eval's results (its `results` dict, per task: metric -> value) for one model; `tasks` as load_tasks built
    them, or None to let lm_eval build them from their names."""
    from lm_eval.models.huggingface import HFLM

    from alignkit.core.groups import loader_settings
    from alignkit.modeling.models import load_model

    loaded = load_model(loader_settings(s, source))
    if s.apply_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        raise ConfigError(f"{source} has no chat template: pass --chat_template FILE, or --apply_chat_template false "
                          "to give every model the plain prompts")
    _quiet_lm_eval()
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=s.batch_size)
    from importlib import import_module

    from alignkit.core.progress import bars_by_rule

    # lm_eval's bars are tqdm's own: alignkit's rule decides them (drawn in a terminal or a notebook, not in logs).
    drawing = [import_module(f"lm_eval.{name}") for name in ("api.model", "api.task", "models.huggingface")]
    with bars_by_rule(*drawing):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks or list(s.tasks), task_manager=task_manager, num_fewshot=s.num_fewshot, limit=s.limit,
            apply_chat_template=s.apply_chat_template, fewshot_as_multiturn=bool(multiturn(s)),
            system_instruction=s.system_instruction, gen_kwargs=gen_kwargs(s), bootstrap_iters=s.bootstrap_iters,
            log_samples=False, random_seed=s.seed, numpy_random_seed=s.seed, torch_random_seed=s.seed,
            fewshot_random_seed=s.seed,
        )
    as_loaded = {"dtype": str(loaded.dtype).removeprefix("torch."), "quantization": loaded.quantization}
    return {"results": out["results"], "versions": out.get("versions", {}), "n-shot": out.get("n-shot", {}),
            "as_loaded": as_loaded}


class _HandedModel(logging.Filter):
    """lm_eval warns twice, for every model, of a `pretrained` model not given by name: it may ignore other model
    arguments and must not run under accelerate, and it is taken for a single process. alignkit hands it the
    model it loaded, by design, and evaluate.py refuses a launcher before any model loads."""

    SAID = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.SAID)


def _quiet_lm_eval() -> None:
    """lm_eval's noise that the user cannot act on: the warning above, and the `fatal: not a git repository` that
    git prints when lm_eval records the commit of the folder it runs in and that is no repository (it records
    none then, as before)."""
    import subprocess

    import lm_eval.evaluator as evaluator

    handed = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _HandedModel) for f in handed.filters):
        handed.addFilter(_HandedModel())
    if not getattr(evaluator.get_git_commit_hash, "alignkit_quiet", False):
        asked = evaluator.get_git_commit_hash

        def quietly():
            try:
                subprocess.run(["git", "rev-parse", "--git-dir"], check=True, capture_output=True)
            except (subprocess.CalledProcessError, OSError):
                return None  # no repository here (or no git): nothing to record, nothing said
            return asked()

        quietly.alignkit_quiet = True
        evaluator.get_git_commit_hash = quietly


_TASK_MANAGERS: dict = {}  # ((include_path, its files as they are), whole index?) -> lm_eval's TaskManager


def _task_manager(TaskManager, include_path, tasks=()):
    """lm_eval's TaskManager, which reads every task's YAML (its own 14,000 and more: 4 to 7 s) on each build: one
    per process for an --include_path as its files are (name, size, time of change), so that an evaluate cell run
    again, or rlaif's next round, does not read them all again, and an edited task file is read anew.

    Where every name of `tasks` is a task (or a tag of tasks) of --include_path, the index is that folder's alone
    (include_defaults=False): lm_eval builds such a task from its own YAML, as the whole index would (a folder's task
    overrides lm_eval's of that name there too), and a local task, or a bad one refused before any model loads, no
    longer waits on lm_eval's own. A group (whose tasks may be lm_eval's), or a name the folder lacks (lm_eval's own,
    or none: the check of unknown tasks offers the closest of all), gets the whole index."""
    files = ()
    if include_path:
        root = Path(include_path)
        files = tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()))
    folder = (str(Path(include_path).resolve()) if include_path else None, files)
    if all(key[0] != folder for key in _TASK_MANAGERS):
        _TASK_MANAGERS.clear()  # kept for the folder as it is now: its own index and the whole
    if include_path:
        if (folder, False) not in _TASK_MANAGERS:
            _TASK_MANAGERS[folder, False] = TaskManager(include_path=include_path, include_defaults=False)
        local = _TASK_MANAGERS[folder, False]
        if all(name in local.task_index and local.task_index[name].kind.name != "GROUP" for name in tasks):
            return local
    if (folder, True) not in _TASK_MANAGERS:
        _TASK_MANAGERS[folder, True] = TaskManager(include_path=include_path) if include_path else TaskManager()
    return _TASK_MANAGERS[folder, True]


def run(s) -> tuple[dict[str, dict], Path, Path, Path]:
    """Evaluate every model (or reuse its kept results), then write the table, JSON and chart."""
    lm_eval = require()
    from lm_eval.tasks import TaskManager

    from alignkit.evals.named_models import parse_models
    from alignkit.modeling.lineage import check_models
    from alignkit.modeling.model_folders import check_model_sources

    models = parse_models(s.models)
    check_models(s, models.values())  # all of them before the first is evaluated
    if s.preset == "tiny" and s.include_path:
        tiny_task(s.include_path)
    if s.include_path and not Path(s.include_path).is_dir():
        raise ConfigError(f"--include_path {s.include_path}: no such folder; pass the folder that holds your lm_eval "
                          "task YAML configs")
    task_manager = _task_manager(TaskManager, s.include_path, s.tasks)
    if unknown := [t for t in s.tasks if t not in task_manager.all_tasks]:
        import difflib

        close = [c for t in unknown for c in difflib.get_close_matches(t, task_manager.all_tasks, n=1)]
        meant = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"lm_eval has no task {', '.join(map(repr, unknown))}{meant}: name tasks as lm_eval lists "
                          "them (lm_eval ls tasks), or put their YAML configs in --include_path")
    out = Path(s.output_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    keys = {name: _key(s, source) for name, source in models.items()}
    kept_results = {name: _kept(out / "models" / f"{name}.json") for name in models}  # {}: missing or torn
    fresh = {name: kept_results[name][keys[name]] for name in models if keys[name] in kept_results[name]}
    check_model_sources(s, [source for name, source in models.items() if name not in fresh])  # before the first runs
    # The tasks' data, before any model loads; handed to the first model's run, the next ones build their own (a
    # Task keeps state between runs: each model gets fresh ones, as lm_eval builds them).
    built = load_tasks(s, task_manager) if len(fresh) < len(models) else None
    results, loaded, settings = {}, {}, harness_settings(s)
    for name, source in models.items():
        kept, key = out / "models" / f"{name}.json", keys[name]
        if name in fresh:
            earlier = fresh[name]
            results[name], loaded[name] = earlier["results"], earlier.get("loaded_with") or loaded_with(s, source)
            logger.info(f"lm_eval: {name} ({source}): kept results reused ({kept})")
            continue
        logger.info(f"lm_eval: {name} ({source}) on {', '.join(s.tasks)}")
        evaluated = evaluate_model(s, source, lm_eval, task_manager, built)
        built = None
        # Beside the results of other settings (a --limit run replaced the full one, evaluated again after it).
        as_loaded = evaluated.pop("as_loaded", {})  # what `auto` became, beside the loader settings as given
        evaluated["loaded_with"] = {**loaded_with(s, source), "as_loaded": as_loaded}
        entries = {**kept_results[name], key: {"key": key, "source": source, "settings": settings, **evaluated}}
        entries = dict(list(entries.items())[-KEPT_PER_MODEL:])  # the latest: a model retrained 50 times keeps 8
        write_atomic(kept, json.dumps(entries, indent=2, default=str) + "\n")
        results[name], loaded[name] = evaluated["results"], evaluated["loaded_with"]
    table = format_table(results)
    write_atomic(out / "results.md", f"{describe(settings)}\n\n{describe_models(models, loaded)}\n\n{table}\n")
    write_atomic(out / "results.json", json.dumps({"models": models, "loaded_with": loaded, "settings": settings,
                                                   "results": results}, indent=2, default=str) + "\n")
    chart = plot(results, out / "results.png")
    return results, out / "results.md", out / "results.json", chart


def _kept(path: Path) -> dict[str, dict]:
    """{key: results} a model's kept file holds, one entry per settings it was evaluated under (a file of one entry,
    as written before, read as such)."""
    data = read_json(path)
    entries = {data["key"]: data} if "key" in data else data
    return {k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("results"), dict)}


def harness_settings(s) -> dict:
    """The settings the numbers were made under, beside them in results.md and results.json."""
    from importlib.metadata import version

    return {"tasks": list(s.tasks), "num_fewshot": s.num_fewshot, "limit": s.limit,
            "apply_chat_template": s.apply_chat_template, "fewshot_as_multiturn": multiturn(s),
            "system_instruction": s.system_instruction, "gen_kwargs": gen_kwargs(s),
            "bootstrap_iters": s.bootstrap_iters, "seed": s.seed, "lm_eval": version("lm_eval")}


def multiturn(s) -> bool | None:
    """lm_eval's fewshot_as_multiturn as it runs: true under the chat template unless --fewshot_as_multiturn false
    (lm_eval 0.4's default, which results did not say); None without the template, where it means nothing."""
    return s.fewshot_as_multiturn is not False if s.apply_chat_template else None


def gen_kwargs(s) -> dict | None:
    """--gen_kwargs as lm_eval's own CLI reads them (KEY=VALUE arguments, commas between pairs, or a JSON object),
    or None. A malformed one is one line before any model loads: lm_eval raised it after the first had loaded."""
    if not s.gen_kwargs:
        return None
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    parsed = {}
    for given in s.gen_kwargs:
        try:
            value = try_parse_json(given)
            parsed.update(value if isinstance(value, dict) else key_val_to_dict(given))
        except ValueError as e:
            raise ConfigError(f"--gen_kwargs {given!r}: {e}; write KEY=VALUE (e.g. --gen_kwargs temperature=0 "
                              "max_gen_toks=512) or a JSON object") from None
    return parsed or None


def loaded_with(s, source: str) -> dict:
    """How a model was loaded, beside its numbers: the loader settings as given (secrets masked), and where it was
    evaluated, `as_loaded`: what `auto` became (dtype, quantization). results.json named each model by its source
    alone: a 4-bit and a bf16 evaluation of one model could not be told apart."""
    from alignkit.core.groups import loader_settings
    from alignkit.core.saved_settings import config_to_dict

    return config_to_dict(loader_settings(s, source))
