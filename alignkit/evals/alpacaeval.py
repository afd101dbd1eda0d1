"""AlpacaEval win rates through the real `alpaca_eval` package (0.6.x), for `evaluate.py alpaca_eval`.

The flow, and where each step lives in `--output_dir`:
1. The eval set: AlpacaEval's 805 instructions (the Hub file `tatsu-lab/alpaca_eval`
   alpaca_eval_gpt4_baseline.json, which also holds AlpacaEval 2's GPT-4 Turbo reference outputs), or any
   JSON/JSONL file of rows with an `instruction` (`--eval_set`); `--max_instances` keeps the first N.
2. Outputs in AlpacaEval's format (instruction, output, generator, dataset), generated with alignkit's own
   backends (alignkit.modeling.generation.load_generator: vLLM on a GPU, batched transformers elsewhere) and appended
   to `model_outputs/<name>.jsonl` batch by batch, so a killed run keeps every finished batch and a rerun
   generates only what is missing. `model_outputs/<name>.json` is the same in AlpacaEval's JSON list form.
3. References: `--reference_outputs FILE` (AlpacaEval's format), `--reference_model MODEL` (generated like 2),
   or AlpacaEval 2's reference outputs with the default eval set.
4. Annotations by `alpaca_eval.evaluate` itself: the annotator config's prompt template, its random output
   order, its parser (ranking JSON for alpaca_eval_gpt4, log-probs of the tokens m/M for
   weighted_alpaca_eval_gpt4_turbo), and its requests through alpaca_eval's own `openai_completions`, pointed
   at `--judge_base_url` with the key from the variable `--judge_api_key_env` names. Two stores make a
   rerun send no request twice:
   - alpaca_eval's annotation cache (`annotations/<config>-<key>.json`, rows keyed by instruction, both
     outputs and annotator), written after each chunk of rows. alpaca_eval's key leaves out the judge model,
     the endpoint and the config's content, so the file name carries a hash of those;
   - alignkit's request log (`annotations/requests-<config>-<key>.jsonl`): each judge answer appended the
     moment it arrives, keyed by the prompt, the endpoint and every decoding argument. A run killed inside a
     chunk loses no answer it paid for. A request that failed (alpaca_eval returns an empty text after its
     retries) is not logged, and its row is not cached as annotated, so a rerun asks again.
5. Metrics by alpaca_eval's own `get_length_controlled_winrate`: win_rate (mean of preference - 1, in %),
   standard_error, discrete_win_rate, and the length-controlled win rate of a logistic GLM
   P(model wins) = sigmoid(theta * tanh(delta_len / std(delta_len)) + phi * difficulty + psi) predicted at
   delta_len = 0 (AlpacaEval 2's length_controlled_v1, regularised towards its gamed baselines). On a set
   that is not AlpacaEval's, instruction difficulties do not exist, so `auto` picks length_controlled_minimal
   (no difficulty term, no regularisation).
   Written per comparison to `<config>/<reference>/`: alpaca_eval's leaderboard.csv and annotations.json,
   summary.json, and win_rates.png (win rate and LC win rate with +-1 standard error bars, every model in
   that leaderboard).

What alpaca_eval fetches at run time, and the offline path for each:
- the eval set / reference outputs: the Hub file above (`datasets.load_dataset` of AlpacaEval's loading script
  does not run under datasets >= 4, so alignkit fetches the JSON file itself): offline it comes from the Hub
  cache, else a clear error says to pass `--eval_set` and `--reference_outputs`;
- `df_gamed.csv` (instruction difficulties and gamed baselines) for length_controlled_v1: Hub cache or
  `--lc_data FILE`, else an error naming both and `--lc_glm length_controlled_minimal`;
- tiktoken encodings, only for configs with tokens_to_avoid/tokens_to_favor (alpaca_farm): checked before any
  request, with an error naming TIKTOKEN_CACHE_DIR.
alpaca_eval 0.6.6 imports `pkg_resources`, which setuptools >= 81 no longer ships: a two-function stand-in
(packaging's parse_version, importlib.metadata's version) is registered when the real one is missing.

`--judge_model rule` (the tiny preset): `rule_completions` stands in for the OpenAI call. It reads the
instruction and both outputs back from the prompt alpaca_eval rendered with weighted_alpaca_eval_gpt4_turbo's
template and answers with the log-probs of m/M the tiny preset's rule judge implies (1 for its winner, 0.5
each on a tie), so alpaca_eval's own order randomisation, parser, caching and metrics all run offline.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError, config_to_dict
from alignkit.core.journal import append_jsonl, threaded, write_json
from alignkit.core.progress import Progress

HUB_REPO = "tatsu-lab/alpaca_eval"
EVAL_FILE = "alpaca_eval_gpt4_baseline.json"  # the 805 instructions with AlpacaEval 2's reference outputs
GLM_FILE = "df_gamed.csv"
CHUNKSIZE = 64  # rows per alpaca_eval annotation chunk (its cache is written after each)
OUTPUT_KEYS = ("instruction", "output", "generator", "dataset")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FAILED = ""  # alpaca_eval's text for a request that failed after its retries


# ---------------------------------------------------------------------------------------------------------
# The package


def _pkg_resources_stand_in() -> None:
    """alpaca_eval.utils imports pkg_resources for two calls; setuptools >= 81 removed the module."""
    import importlib.metadata
    import types

    from packaging.version import parse

    module = types.ModuleType("pkg_resources")
    module.parse_version = parse
    module.get_distribution = lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))
    sys.modules["pkg_resources"] = module


def load_package():
    """`import alpaca_eval`, with the pkg_resources stand-in when needed."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        _pkg_resources_stand_in()
    from alignkit.core.extras import require

    return require("alpaca_eval", "eval", "evaluate.py alpaca_eval")


def hub_file(filename: str, how: str) -> Path:
    """A file of the Hub dataset tatsu-lab/alpaca_eval: from the Hub cache, or downloaded once into it."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HUB_REPO, filename, repo_type="dataset"))
    except Exception as e:  # offline, no network, gated: all the same to the user
        raise ConfigError(f"{filename} of the Hub dataset {HUB_REPO} is not in the Hub cache and could not be "
                          f"downloaded ({type(e).__name__}). Fetch it once with network (hf download {HUB_REPO} "
                          f"{filename} --repo-type dataset), or {how}") from None


# ---------------------------------------------------------------------------------------------------------
# The eval set and output files


def read_rows(path, flag: str) -> list[tuple[str, dict]]:
    """(where, row) of a JSON list or JSONL file; a bad file or row is an error naming the file and row."""
    from alignkit.core.journal import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path} not found; check the path")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {flag} takes a JSON list of "
                              "objects or JSONL") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        rows = [(f"{path}, row {i}", row) for i, row in enumerate(data, 1)]
    else:
        rows = [(f"{path}, line {i}", row) for i, row in read_jsonl(path, f"{flag} takes JSONL or a JSON list")]
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return rows


def _text(where, row, field, fix) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: field {field!r} must be a non-empty string, got {value!r:.80}; {fix}")
    return value


def load_eval_set(eval_set: str | None, max_instances: int | None) -> tuple[list[dict], list[dict] | None]:
    """(rows {instruction, dataset}, AlpacaEval 2's reference outputs for them when the set is AlpacaEval's)."""
    hub = eval_set is None
    path = hub_file(EVAL_FILE, "pass your own --eval_set FILE (and --reference_outputs FILE or --reference_model)") \
        if hub else Path(eval_set)
    fix = "each row needs an `instruction`"
    rows, seen = [], {}
    for where, row in read_rows(path, "--eval_set"):
        instruction = _text(where, row, "instruction", fix)
        if instruction in seen:  # alpaca_eval pairs outputs by instruction: a repeat would pair the wrong ones
            raise ConfigError(f"{where}: the instruction repeats {seen[instruction]}; keep one of them")
        seen[instruction] = where
        dataset = row.get("dataset") if isinstance(row.get("dataset"), str) else path.stem
        rows.append({**row, "instruction": instruction, "dataset": dataset})
    if not rows:
        raise ConfigError(f"{path} holds no instructions; {fix}")
    rows = rows[:max_instances] if max_instances else rows
    references = [{k: r[k] for k in OUTPUT_KEYS} for r in rows] if hub else None
    return [{"instruction": r["instruction"], "dataset": r["dataset"]} for r in rows], references


def load_reference_outputs(path, rows: list[dict], name: str | None) -> list[dict]:
    """The reference output of every eval-set instruction from a file in AlpacaEval's format."""
    fix = "rows need `instruction` and `output` (AlpacaEval's format)"
    found = {}
    for where, row in read_rows(path, "--reference_outputs"):
        instruction = _text(where, row, "instruction", fix)
        output = row.get("output")
        if not isinstance(output, str):
            raise ConfigError(f"{where}: field 'output' must be a string, got {output!r:.80}; {fix}")
        generator = name or (row["generator"] if isinstance(row.get("generator"), str) else Path(path).stem)
        found[instruction] = {"instruction": instruction, "output": output, "generator": generator}
    missing = [r["instruction"] for r in rows if r["instruction"] not in found]
    if missing:
        raise ConfigError(f"--reference_outputs {path} has no output for {len(missing)} of the eval set's "
                          f"{len(rows)} instructions, e.g. {missing[0]!r:.100}; add them, or evaluate on the set the "
                          "file answers (--eval_set)")
    return [{**found[r["instruction"]], "dataset": r["dataset"]} for r in rows]


def default_name(source: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).name).lstrip("._-")
    return name or "model"


def check_name(name: str, flag: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{flag} {name!r}: use letters, digits, '.', '_' or '-' (it names files)")
    return name


def outputs_path(output_dir, name: str) -> Path:
    return Path(output_dir) / "model_outputs" / f"{name}.jsonl"


def _generation(s) -> dict:
    return {k: getattr(s, k) for k in ("temperature", "top_p", "num_beams", "max_new_tokens", "seed")}


def outputs_key(s, source: str, backend: str) -> str:
    """The model that makes `source`'s outputs, as loaded (alignkit.modeling.identity: every loader setting, every
    file down its adapter chain, the GGUF file, the backend, the hardware). Stamped on each output record."""
    from alignkit.core.config import loader_settings
    from alignkit.modeling.identity import identity_key

    return identity_key(loader_settings(s, source), backend)


def read_outputs(path, source: str, generation: dict, identity: str | None = None) -> dict[str, dict]:
    """{instruction: record} of an outputs log; records from another model, another model as loaded (`identity`,
    see outputs_key) or other sampling are an error: the old outputs are never scored as the new model's."""
    from alignkit.core.journal import read_jsonl
    from alignkit.evals.mtbench import _same_source

    fix = "delete the file (or the line) to generate again"
    out = {}
    for line, row in read_jsonl(path, fix, repair_tail=True):
        where = f"{path}, line {line}"
        _text(where, row, "instruction", fix)
        if not isinstance(row.get("output"), str):
            raise ConfigError(f"{where}: field 'output' must be a string; {fix}")
        if row.get("source") is not None and _same_source(row["source"]) != _same_source(source):
            raise ConfigError(f"{path} holds outputs by {row['source']}, not {source}: give this model another "
                              "--model_name / --reference_name, use another --output_dir, or delete the file")
        if row.get("generation") not in (None, generation):
            raise ConfigError(f"{where}: generated with {row['generation']}, not {generation}: use another "
                              "--output_dir, or delete the file to generate again with the new settings")
        if identity is not None and row.get("identity") != identity:
            raise ConfigError(f"{where}: generated by another model as loaded than {source} now (its files, down its "
                              "adapter chain, or its loading: dtype, quantization, chat template, GGUF file, backend, "
                              "hardware): use another --output_dir, or delete the file to generate again")
        out[row["instruction"]] = row
    return out


def generate_outputs(generator, rows: list[dict], name: str, source: str, path, s, identity: str | None = None) -> int:
    """Generate the outputs `path` lacks, batch by batch, appending each batch's records as it finishes."""
    path = Path(path)
    generation = _generation(s)
    todo = [r for r in rows if r["instruction"] not in read_outputs(path, source, generation, identity)]
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(f"{name}: generating", len(todo), unit="output", errors=False)
    for start in range(0, len(todo), s.batch_size):
        batch = todo[start : start + s.batch_size]
        outs = generator([[{"role": "user", "content": r["instruction"]}] for r in batch],
                         max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                         num_beams=s.num_beams, batch_size=len(batch), seed=s.seed)
        append_jsonl(path, [{"instruction": row["instruction"], "output": out, "generator": name,
                             "dataset": row["dataset"], "source": source, "generation": generation,
                             "identity": identity}
                            for row, out in zip(batch, outs, strict=True)])
        progress.update(len(batch))
    progress.close()
    return len(todo)


def model_outputs(source: str, name: str, rows: list[dict], s, backend: str) -> list[dict]:
    """The outputs of model `source` on `rows` in AlpacaEval's format, generated where missing."""
    from alignkit.core.config import loader_settings
    from alignkit.modeling.generation import load_generator

    path = outputs_path(s.output_dir, name)
    generation = _generation(s)
    if getattr(s, "preset", None) == "tiny" and not Path(source).exists():
        raise ConfigError(f"{source} not found: train the tiny runs first (python sft.py --preset tiny; python "
                          "dpo.py --preset tiny --model_id runs/tiny-sft), or pass --model_id / --reference_model")
    identity = outputs_key(s, source, backend)
    done = read_outputs(path, source, generation, identity)
    missing = [r for r in rows if r["instruction"] not in done]
    if missing:
        print(f"{name}: {len(rows) - len(missing)} outputs from before, generating {len(missing)} with {source}")
        with load_generator(loader_settings(s, source), backend) as generator:
            generate_outputs(generator, missing, name, source, path, s, identity)
        done = read_outputs(path, source, generation, identity)
    else:
        print(f"{name}: all {len(rows)} outputs generated before ({path})")
    outputs = [{k: (name if k == "generator" else done[r["instruction"]][k]) for k in OUTPUT_KEYS} for r in rows]
    write_json(path.with_suffix(".json"), outputs)
    return outputs


# ---------------------------------------------------------------------------------------------------------
# The annotator: alpaca_eval's config, pointed at the endpoint


def _canonical_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def annotator_config(s, output_dir) -> tuple[Path, str, dict]:
    """(derived configs.yaml, config name, its annotators) for --annotators_config.

    The derived copy differs from alpaca_eval's in three ways: prompt templates are absolute paths, the judge
    model is --judge_model, and `fn_completions` is left out so alignkit's logged decoder can be passed in.
    """
    import yaml

    load_package()
    from alpaca_eval import constants, utils

    given = Path(s.annotators_config)
    if given.exists():
        path = given / "configs.yaml" if given.is_dir() else given
    else:
        path = constants.EVALUATORS_CONFIG_DIR / s.annotators_config / "configs.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in constants.EVALUATORS_CONFIG_DIR.glob("*/configs.yaml"))
        raise ConfigError(f"--annotators_config {s.annotators_config}: no such file, nor a config of alpaca_eval "
                          f"(e.g. {', '.join(k for k in known if 'gpt4' in k)[:300]})")
    name = path.parent.name
    annotators = {}
    for annotator, cfg in utils.load_configs(path).items():
        cfg = copy.deepcopy(cfg)
        decoder = cfg.pop("fn_completions", "openai_completions")
        if decoder != "openai_completions":
            raise ConfigError(f"{path}: annotator {annotator} decodes with {decoder}; evaluate.py alpaca_eval sends "
                              "annotators to an OpenAI-compatible endpoint, so pick a config whose fn_completions is "
                              "openai_completions (weighted_alpaca_eval_gpt4_turbo, alpaca_eval_gpt4, ...)")
        template = Path(cfg["prompt_template"])
        template = template if template.is_absolute() else path.parents[1] / template
        if not template.is_file():
            raise ConfigError(f"{path}: annotator {annotator}'s prompt_template {template} does not exist")
        cfg["prompt_template"] = str(template)
        kwargs = cfg.setdefault("completions_kwargs", {})
        if s.judge_model and s.judge_model != "rule":
            kwargs["model_name"] = s.judge_model
        annotators[annotator] = cfg
    derived = Path(output_dir) / "annotators" / name / "configs.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    derived.write_text(yaml.safe_dump(annotators, sort_keys=False), encoding="utf-8")
    return derived, name, annotators


def check_tiktoken(annotators: dict) -> None:
    """Configs that bias tokens (tokens_to_avoid/favor) need the judge model's tiktoken encoding, which tiktoken
    downloads on first use: check it loads before any request is sent."""
    for annotator, cfg in annotators.items():
        kwargs = cfg.get("completions_kwargs", {})
        if kwargs.get("tokens_to_avoid") or kwargs.get("tokens_to_favor"):
            import tiktoken

            try:
                tiktoken.encoding_for_model(kwargs["model_name"])
            except Exception as e:
                raise ConfigError(
                    f"annotator {annotator} biases tokens (tokens_to_avoid/tokens_to_favor), which needs tiktoken's "
                    f"encoding of {kwargs['model_name']} ({type(e).__name__}: {e}): it must be an OpenAI model, and "
                    "offline its encoding file must be in TIKTOKEN_CACHE_DIR; or pick a config without them"
                ) from None


def endpoint(s) -> dict:
    """alpaca_eval's client arguments for the judge endpoint; fails fast, naming the variable, without a key."""
    from alignkit.core.llm import endpoint_key

    api_key, base_url = endpoint_key(s.judge_api_key_env, s.judge_base_url,
                                     "the judge (--judge_api_key_env names the key's variable)")
    base_url = base_url or "https://api.openai.com/v1"
    # client_config_path: a path that is never a file, so alpaca_eval builds the client from the arguments below
    # rather than from a client_configs yaml found on this machine. alpaca_eval keeps keys named *api_key* out of
    # its logs; these never reach a file.
    return {"openai_api_keys": [api_key], "openai_api_base": base_url, "client_config_path": os.devnull,
            "client_kwargs": {"max_retries": s.max_retries, "timeout": s.request_timeout}}


class LoggedCompletions:
    """`fn_completions` for alpaca_eval's annotators: its own `openai_completions`, one prompt per call,
    `parallel` at a time, each answer appended to a JSONL log as it arrives and reused by any later call with the
    same prompt, endpoint and decoding arguments (the log's key). Counts what it sent and reused."""

    def __init__(self, path, client: dict, parallel: int = 1, fn=None):
        from alignkit.core.journal import read_jsonl

        if fn is None:
            load_package()
            from alpaca_eval.decoders.openai import openai_completions as fn
        self.path, self.client, self.parallel, self.fn = Path(path), client, parallel, fn
        self.entries = {row["key"]: row for _, row in read_jsonl(self.path, "delete the line to ask again",
                                                                 repair_tail=True) if "key" in row}
        self.sent = self.reused = self.failed = 0
        self._lock = threading.Lock()

    def key(self, prompt: str, kwargs: dict) -> str:
        decoding = {k: v for k, v in kwargs.items() if k not in ("num_procs",)}  # concurrency changes no answer
        return _canonical_hash({"prompt": prompt, "base_url": self.client["openai_api_base"], "decoding": decoding})

    def _ask(self, prompt: str, key: str, kwargs: dict) -> dict:
        out = self.fn([prompt], **{**kwargs, "num_procs": 1}, **self.client)
        record = {"key": key, **{k: v[0] for k, v in out.items()}, "tstamp": time.time()}
        with self._lock:
            if record.get("completions") == _FAILED:
                self.failed += 1
                return record
            self.sent += 1
            append_jsonl(self.path, [record])
            self.entries[key] = record
        return record

    def __call__(self, prompts, **kwargs) -> dict:
        keys = [self.key(p, kwargs) for p in prompts]
        records = [self.entries.get(k) for k in keys]
        self.reused += sum(r is not None for r in records)
        todo = [i for i, r in enumerate(records) if r is None]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with Progress("annotating", len(todo), unit="pair", errors=False) as progress:
            for i, record in threaded(lambda i: self._ask(prompts[i], keys[i], kwargs), todo, self.parallel,
                                      stop_on_error=True):
                if isinstance(record, BaseException):
                    raise record  # what alpaca_eval's own call would raise; the answers so far are journaled
                records[i] = record
                progress.update()
        names = [k for k in records[0] if k not in ("key", "tstamp")] if records else []
        return {name: [r.get(name) for r in records] for name in names}


# ---------------------------------------------------------------------------------------------------------
# The tiny preset's rule judge, standing in for the annotator's model

_CLF_PROMPT = re.compile(r'"instruction": """(?P<instruction>.*?)""",.*?"model_identifier": "m",\s*"output": """'
                         r'(?P<output_1>.*?)""".*?"model_identifier": "M",\s*"output": """(?P<output_2>.*?)"""', re.S)


def check_rule_config(annotators: dict) -> None:
    for annotator, cfg in annotators.items():
        parser = cfg.get("completion_parser_kwargs", {})
        if cfg.get("fn_completion_parser") != "logprob_parser" or parser.get("numerator_token") != "m" \
                or "alpaca_eval_clf" not in Path(cfg["prompt_template"]).name:
            raise ConfigError(f"--judge_model rule stands in for weighted_alpaca_eval_gpt4_turbo-style annotators "
                              f"(its prompt, log-probs of m/M); {annotator} is not one: drop --annotators_config")


def rule_completions(prompts, rule=None, **kwargs) -> dict:
    """alpaca_eval `fn_completions` answering weighted_alpaca_eval_gpt4_turbo's prompt by a rule(instruction,
    output_1, output_2) -> "A" | "B" | "tie" (default: the tiny preset's), as the log-probs of the tokens m
    (output_1) and M (output_2): probability 1 for the winner, 0.5 each on a tie. Sends nothing."""
    from alignkit.modeling.presets import rule_judge

    rule = rule or rule_judge
    texts, alls = [], []
    for prompt in prompts:
        match = _CLF_PROMPT.search(prompt)
        if match is None:
            raise ValueError("the rule judge reads weighted_alpaca_eval_gpt4_turbo's prompt; this one differs")
        verdict = rule(match["instruction"], match["output_1"], match["output_2"])
        p_m = {"A": 1.0, "B": 0.0}.get(verdict, 0.5)
        tops = [{"token": t, "logprob": math.log(max(p, 1e-12))} for t, p in (("m", p_m), ("M", 1 - p_m))]
        token = "m" if p_m >= 0.5 else "M"
        texts.append(token)
        alls.append({"text": token, "total_tokens": 0, "logprobs": {"content": [
            {"token": token, "logprob": max(t["logprob"] for t in tops), "top_logprobs": tops}]}})
    return {"completions": texts, "completions_all": alls, "price_per_example": [0.0] * len(prompts),
            "time_per_example": [0.0] * len(prompts)}


# ---------------------------------------------------------------------------------------------------------
# Metrics: alpaca_eval's, with the instruction difficulties from a file or the Hub


@contextmanager
def _glm_data(path):
    """alpaca_eval's GLM reads df_gamed.csv through `hf_hub_download`: hand it `path` instead."""
    from alpaca_eval.metrics import glm_winrate

    original = glm_winrate.hf_hub_download
    glm_winrate.hf_hub_download = lambda *args, **kwargs: str(path)
    try:
        yield
    finally:
        glm_winrate.hf_hub_download = original


def forget_failed(cache) -> int:
    """Drop the rows alpaca_eval cached as failed (preference -1: no parsable answer), so this run asks again.

    (alpaca_eval's own switch for this, is_store_missing_annotations=False, fails on a first run in 0.6.6.)"""
    cache = Path(cache)
    if not cache.is_file():
        return 0
    rows = json.loads(cache.read_text(encoding="utf-8") or "[]")
    kept = [r for r in rows if r.get("preference") not in (-1, None)]
    if len(kept) < len(rows):
        write_json(cache, kept)
        logger.info(f"{cache}: {len(rows) - len(kept)} annotations failed before; asking again")
    return len(rows) - len(kept)


def glm_setup(s, rows: list[dict], work_dir) -> tuple[str, Path]:
    """(GLM name, df_gamed-style table) for the length-controlled win rate."""
    glm = s.lc_glm if s.lc_glm != "auto" else "length_controlled_v1" if s.eval_set is None else \
        "length_controlled_minimal"
    if glm == "length_controlled_v1":
        if s.eval_set is not None:
            logger.info("length_controlled_v1 on your own --eval_set: rows are matched to AlpacaEval's instruction "
                        "difficulties by position")
        return glm, Path(s.lc_data) if s.lc_data else hub_file(
            GLM_FILE, "pass it as --lc_data FILE, or use --lc_glm length_controlled_minimal (no instruction difficulty)")
    # length_controlled_minimal has no difficulty term; alpaca_eval still looks every row's difficulty up.
    table = Path(work_dir) / "no_instruction_difficulty.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("model,index,instruction_difficulty\n" + "".join(f"none,{i},0.0\n" for i in range(len(rows))),
                     encoding="utf-8")
    return glm, table


def metric(positions: dict, glm: str, table, weights_dir):
    """alpaca_eval's get_length_controlled_winrate over the annotations, each row's `index` its position in the
    eval set (what the instruction difficulties are indexed by)."""

    def fn(annotations) -> dict:
        import pandas as pd
        from alpaca_eval.metrics import glm_winrate

        df = pd.DataFrame(list(annotations))
        df["index"] = df["instruction"].map(positions)
        with _glm_data(table):
            out = glm_winrate.get_length_controlled_winrate(df, glm_name=glm, save_weights_dir=weights_dir)
        return {k: float(v) if hasattr(v, "__float__") else v for k, v in out.items()}

    return fn


def plot(leaderboard, path, title: str) -> Path:
    """win_rates.png: win rate and length-controlled win rate per model, +-1 standard error."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(leaderboard.index)
    fig = Figure(figsize=(7, 1.2 + 0.55 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]
    for offset, (col, err, label, color) in enumerate([
            ("win_rate", "standard_error", "win rate", "#4c72b0"),
            ("length_controlled_winrate", "lc_standard_error", "length-controlled win rate", "#dd8452")]):
        values = leaderboard[col].astype(float).to_numpy()
        errors = leaderboard[err].astype(float).fillna(0).to_numpy() if err in leaderboard else None
        ax.barh(y + 0.2 - 0.4 * offset, values, xerr=errors, height=0.38, capsize=3, color=color, label=label)
    ax.axvline(50, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(y, names)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% (error bars: 1 standard error; dashed: parity)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------------
# The whole command


def tiny_eval_set() -> Path:
    """The tiny preset's prompts as an AlpacaEval eval set (rows with `instruction`)."""
    from alignkit.modeling.presets import paths, tiny_dir

    path = tiny_dir() / "alpaca_eval_set.json"
    if not path.is_file():
        prompts = [json.loads(line)["prompt"] for line in Path(paths()["prompts"]).read_text().splitlines() if line]
        write_json(path, [{"instruction": p, "dataset": "tiny"} for p in dict.fromkeys(prompts)])
    return path


def tiny_defaults() -> dict:
    """The tiny preset for `evaluate.py alpaca_eval`: the demo's DPO run against its SFT run, rule-judged."""
    from alignkit.modeling.presets import defaults, tiny_dir

    return {**{k: v for k, v in defaults("evaluate").items() if k in ("quantization", "max_new_tokens", "temperature",
                                                                       "batch_size")},
            "model_id": "runs/tiny-dpo", "reference_model": "runs/tiny-sft", "judge_model": "rule",
            "eval_set": str(tiny_dir() / "alpaca_eval_set.json"), "output_dir": "outputs/alpaca_eval-tiny"}


def record_card_results(model_id: str, summary: dict) -> None:
    """A local model folder keeps its AlpacaEval win rates (percent, as alpaca_eval reports them) for its card."""
    from alignkit.core.card import record_evaluation

    for column, label in (("length_controlled_winrate", "length-controlled win rate"), ("win_rate", "win rate")):
        if isinstance(summary.get(column), (int, float)):
            record_evaluation(model_id, f"alpaca_eval {column} vs {summary['reference']}", {
                "benchmark": "AlpacaEval", "dataset": "tatsu-lab/alpaca_eval", "metric": column,
                "value": summary[column], "metric_name": f"{label} vs {summary['reference']} "
                                                         f"(annotator {summary['annotators_config']})"})


def run(s, backend: str) -> dict:
    """evaluate.py alpaca_eval, start to end; returns the summary (also written to summary.json)."""
    import pandas as pd

    from alignkit.core.args import save_config

    use_rule = s.judge_model == "rule"
    # Absolute: alpaca_eval resolves a relative annotator config path against its own package folder.
    output_dir = Path(s.output_dir).resolve()
    client = None if use_rule else endpoint(s)  # a missing key stops the run before any model is loaded
    if s.preset == "tiny" and s.eval_set == str(Path(tiny_defaults()["eval_set"])):
        tiny_eval_set()
    ae = load_package()
    config_path, config_name, annotators = annotator_config(s, output_dir)
    if use_rule:
        check_rule_config(annotators)
    else:
        check_tiktoken(annotators)
    save_config(s, output_dir / "alpaca_eval_config.json")  # secrets redacted

    # The eval set and both sides' outputs
    rows, hub_references = load_eval_set(s.eval_set, s.max_instances)
    name = check_name(s.model_name or default_name(s.model_id), "--model_name")
    if s.reference_outputs:
        references = load_reference_outputs(s.reference_outputs, rows, s.reference_name)
    elif s.reference_model:
        ref_name = check_name(s.reference_name or default_name(s.reference_model), "--reference_name")
        if ref_name == name:
            raise ConfigError(f"the model and the reference are both named {name!r}: pass --model_name or "
                              "--reference_name")
        references = model_outputs(s.reference_model, ref_name, rows, s, backend)
    elif hub_references is not None:
        references = hub_references
    else:
        raise ConfigError("your own --eval_set needs references: --reference_outputs FILE (AlpacaEval's format) or "
                          "--reference_model MODEL")
    ref_name = check_name(references[0]["generator"] if not s.reference_name else s.reference_name, "--reference_name")
    for r in references:
        r["generator"] = ref_name
    if ref_name == name:
        raise ConfigError(f"the model and the reference are both named {name!r}: pass --model_name or --reference_name")
    outputs = model_outputs(s.model_id, name, rows, s, backend)

    # Annotations and metrics by alpaca_eval
    judge = "rule" if use_rule else next(iter(annotators.values()))["completions_kwargs"].get("model_name")
    key = _canonical_hash({"annotators": annotators, "templates": {a: Path(c["prompt_template"]).read_text()
                                                                   for a, c in annotators.items()},
                           "base_url": client["openai_api_base"] if client else "rule"})[:12]
    cache = output_dir / "annotations" / f"{config_name}-{key}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    forget_failed(cache)
    decoder = rule_completions if use_rule else LoggedCompletions(
        output_dir / "annotations" / f"requests-{config_name}-{key}.jsonl", client, s.parallel)
    results_dir = output_dir / config_name / ref_name
    results_dir.mkdir(parents=True, exist_ok=True)
    glm, table = glm_setup(s, rows, output_dir / "annotations")
    positions = {r["instruction"]: i for i, r in enumerate(rows)}
    leaderboard_csv = results_dir / "leaderboard.csv"
    print(f"annotating {len(rows)} pairs ({name} vs {ref_name}) with {config_name}, judge {judge}")
    leaderboard, annotations = ae.evaluate(
        model_outputs=pd.DataFrame(outputs), reference_outputs=pd.DataFrame(references),
        annotators_config=str(config_path), name=name, output_path=str(results_dir),
        precomputed_leaderboard=str(leaderboard_csv) if leaderboard_csv.exists() else None,
        is_overwrite_leaderboard=True, is_return_instead_of_print=True, is_cache_leaderboard=False,
        fn_metric=metric(positions, glm, table, results_dir / "glm_weights"), sort_by="length_controlled_winrate",
        annotation_kwargs={"chunksize": CHUNKSIZE}, caching_path=str(cache), fn_completions=decoder,
    )
    leaderboard.to_csv(leaderboard_csv)  # the same file alpaca_eval wrote, now sorted and with every model
    missing = int(pd.DataFrame(annotations)["preference"].isna().sum()) if annotations else 0
    row = leaderboard.loc[name]
    summary = {
        "model": name, "model_id": s.model_id, "reference": ref_name, "annotators_config": config_name,
        "judge_model": judge, "judge_base_url": None if use_rule else client["openai_api_base"],
        "eval_set": s.eval_set or f"{HUB_REPO}/{EVAL_FILE}", "instances": len(rows), "missing_annotations": missing,
        "glm": glm, **{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in row.items()},
        "requests": {"sent": decoder.sent, "reused": decoder.reused, "failed": decoder.failed}
        if isinstance(decoder, LoggedCompletions) else None,
        "files": {"leaderboard": str(leaderboard_csv), "annotations": str(results_dir / "annotations.json"),
                  "annotation_cache": str(cache), "outputs": str(outputs_path(output_dir, name).with_suffix(".json")),
                  "chart": str(results_dir / "win_rates.png")},
        "settings": config_to_dict(s),
    }
    write_json(results_dir / "summary.json", summary)
    record_card_results(s.model_id, summary)
    plot(leaderboard, results_dir / "win_rates.png", f"AlpacaEval vs {ref_name}; annotator {config_name}, judge {judge}")
    columns = [c for c in ("length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error", "n_total",
                           "avg_length") if c in leaderboard]
    print(leaderboard[columns].to_string(float_format=lambda v: f"{v:.2f}"))
    if missing:
        print(f"{missing} annotations missing (the judge failed or answered off-format); a rerun asks again")
    print(f"\nsummary: {results_dir / 'summary.json'}\nchart:   {results_dir / 'win_rates.png'}")
    return summary
