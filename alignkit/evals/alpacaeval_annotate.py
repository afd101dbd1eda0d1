"""The annotator side of `evaluate.py alpaca_eval` (alignkit.evals.alpacaeval): alpaca_eval itself, its annotator
config pointed at the judge endpoint, and the two stores that make a rerun send no request twice.

- `load_package`: `import alpaca_eval`, with a stand-in for the `pkg_resources` it imports (setuptools >= 81
  no longer ships it); `alpaca_eval_quiet` hides its chatter while it runs.
- `annotator_config`: a copy of the annotators config with absolute prompt templates, --judge_model, and no
  `fn_completions`, so `LoggedCompletions` can be passed in: alpaca_eval's own `openai_completions`, each answer
  appended to `annotations/requests-<config>-<key>.jsonl` the moment it arrives and reused by any later call
  with the same prompt, endpoint and decoding arguments.
- `annotation_store`: alpaca_eval's annotation cache file, keyed by what alpaca_eval's own key leaves out (the
  judge model, the endpoint or the rule's code, the config's content), rows that failed before dropped so this
  run asks again.
- `rule_completions`: the tiny preset's rule judge standing in for the annotator's model, sending nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError, redact
from alignkit.core.errors import UserError
from alignkit.core.digests import digest
from alignkit.core.journal import append_jsonl, threaded, write_json
from alignkit.core.llm import SILENT_MARK
from alignkit.core.progress import Progress

_FAILED = ""  # alpaca_eval's text for a request that failed after its retries


class JudgeFailed(UserError):
    """A judge request that failed after its retries (an HTTP error, a rate limit): one line, the run stopped."""


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
    """`import alpaca_eval`, with the pkg_resources stand-in when needed. Its import sets the root logger to INFO
    for the process (annotators/base.py): the level is put back, or every library's INFO lines showed from then on
    (a notebook's later cells)."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        _pkg_resources_stand_in()
    from alignkit.core.extras import require

    level = logging.getLogger().level
    try:
        return require("alpaca_eval", "eval", "evaluate.py alpaca_eval")
    finally:
        logging.getLogger().setLevel(level)


@contextlib.contextmanager
def alpaca_eval_quiet(package):
    """While alpaca_eval (`package`, load_package's) runs: its INFO lines hidden ("Evaluating the tiny outputs.",
    "Creating the annotator from ...", "Saving all results to ...": six a run, over alignkit's progress and its table)
    and its warning that the annotation cache path alignkit passes is not 'auto' (annotation_store keys that file by
    the judge). Its other warnings and its errors pass. The filter goes when the run ends, however it ends: it was
    left on the root logger for good, and a notebook's later alpaca_eval lines stayed hidden.

    alpaca_eval logs through the root logger itself (logging.info, no logger of its own), so a record is told its
    by the file that logged it: one of the package's own (any path with an alpaca_eval folder in it was taken)."""
    folder = os.path.join(os.path.dirname(package.__file__), "")

    def chatter(record) -> bool:
        if record.name != "root" or not record.pathname.startswith(folder):
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith("Saving_path is given but not")

    root = logging.getLogger()  # where alpaca_eval logs, at INFO from its import on
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


# ---------------------------------------------------------------------------------------------------------
# The annotator: alpaca_eval's config, pointed at the endpoint


def _canonical_hash(value) -> str:
    return digest(value, ensure_ascii=True)


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


# alpaca_eval's log records of a failed request (decoders/openai.py): a traceback ("Unknown error:"), a retry it will
# not make (alignkit asks for one pass), and its empty answer; JudgeFailed says each in one line.
_SAID_BY_ALIGNKIT = ("Unknown error:", "Hit request rate limit; retrying", "Max retries reached", "Sleeping 0 before")


def _not_about_a_silent_judge(record) -> bool:
    """A logging filter: False for alpaca_eval's records of a silent judge's error (alignkit.core.llm), which
    alignkit says in one line of its own."""
    error = record.exc_info[1] if record.exc_info else None
    message = record.getMessage()
    if message.startswith(_SAID_BY_ALIGNKIT) and record.name == "root":  # alpaca_eval's: alignkit says it in one line
        return False
    return SILENT_MARK not in f"{message} {error or ''}"


class LoggedCompletions:
    """`fn_completions` for alpaca_eval's annotators: its own `openai_completions`, one prompt per call,
    `parallel` at a time, each answer appended to a JSONL log as it arrives and reused by any later call with the
    same prompt, endpoint and decoding arguments (the log's key). Counts what it sent and reused."""

    def __init__(self, path, client: dict, parallel: int = 1, fn=None):
        from alignkit.core.journal import read_jsonl
        from alignkit.core.llm import watched_http_client

        if fn is None:
            load_package()
            from alpaca_eval.decoders.openai import openai_completions as fn
        self.path, self.client, self.parallel, self.fn = Path(path), client, parallel, fn
        self.entries = {row["key"]: row for _, row in read_jsonl(self.path, "delete the line to ask again",
                                                                 repair_tail=True) if "key" in row}
        self.sent = self.reused = self.failed = 0
        self._lock = threading.Lock()
        # A judge that never answers stops the run at its first timeout (alignkit.core.llm), not after
        # --max_retries timeouts per request; the HTTP client is shared by alpaca_eval's client for every call.
        kwargs = client.get("client_kwargs", {})
        self._http, self._silent = watched_http_client("the judge", client["openai_api_base"],
                                                       kwargs.get("timeout", 120.0))
        # alpaca_eval logs any OpenAIError it does not know with its traceback (logging.exception "Unknown error:")
        # before raising it: for a silent judge, whose one line follows, that is 50 lines of noise per request. On
        # the root logger for good: a request still under way logs after the call that raised has returned.
        root = logging.getLogger()
        if _not_about_a_silent_judge not in root.filters:
            root.addFilter(_not_about_a_silent_judge)

    def _failure_line(self, error: Exception | None, status: int | None = None) -> str:
        """The one line for a judge request that failed (`error`, or None where alpaca_eval answered an HTTP `status`
        with an empty completion), saying why by its status: a rate limit, an empty quota, a refusal (a key, URL or
        model name: not retried), or a failure after --max_retries (a server error, a dropped connection)."""
        status = getattr(error, "status_code", status)
        said = f"HTTP {status}" if error is None else f"{type(error).__name__}: {' '.join(redact(str(error)).split())[:200]}"
        retried = f", after --max_retries {self.client.get('client_kwargs', {}).get('max_retries', 0)}"
        if getattr(error, "code", None) == "insufficient_quota":
            what, fix = f"the judge's account has no quota left ({said})", "Add credit, or pass another key " \
                "(--judge_api_key_env names its variable)"
        elif status == 429:
            what, fix = f"the judge is limiting the rate of requests (HTTP 429){retried}", "Lower --parallel, or " \
                "wait for its limit to reset"
        elif status in (401, 403, 404):
            what, fix = f"the judge refused the request ({said})", "Check the API key (--judge_api_key_env), " \
                "--judge_base_url (it usually ends in /v1) and --judge_model"
        elif status is not None and 400 <= status < 500:
            what, fix = f"the judge refused a request ({said})", "Check --judge_model and the annotators config's " \
                "decoding arguments (--annotators_config)"
        else:
            what, fix = f"a judge request failed ({said}){retried}", "Check that the server at --judge_base_url is " \
                "up (the URL usually ends in /v1)"
        return f"{what}: stopped, the {self.sent + self.reused} judge answers so far kept. {fix}, then run the same " \
               "command again"

    def key(self, prompt: str, kwargs: dict) -> str:
        decoding = {k: v for k, v in kwargs.items() if k not in ("num_procs",)}  # concurrency changes no answer
        return _canonical_hash({"prompt": prompt, "base_url": self.client["openai_api_base"], "decoding": decoding})

    def _ask(self, prompt: str, key: str, kwargs: dict) -> dict:
        from alignkit.core.llm import silence_said

        client = {**self.client, "client_kwargs": {**self.client.get("client_kwargs", {}), "http_client": self._http}}
        with silence_said(self._silent):
            # One pass of alpaca_eval's own retry loop: the openai client already retried --max_retries times, and
            # alpaca_eval's ten passes over a rate limit sent 20 requests a prompt, then an empty answer.
            self._http.forget_status()  # this thread's last request may have been another prompt's
            out = self.fn([prompt], **{**kwargs, "num_procs": 1, "n_retries": 1, "sleep_time": 0}, **client)
        record = {"key": key, **{k: v[0] for k, v in out.items()}, "tstamp": time.time()}
        with self._lock:
            if record.get("completions") == _FAILED:
                self.failed += 1
                status = self._http.last_status()
                if status is not None and status >= 400:  # alpaca_eval's empty answer to an error it took for a
                    raise JudgeFailed(self._failure_line(None, status))  # rate limit ("rate " in its text)
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
                if isinstance(record, BaseException):  # the answers so far are journaled
                    if type(record).__module__.split(".")[0] == "openai":  # what alpaca_eval passes on: its traceback
                        raise JudgeFailed(self._failure_line(record)) from None
                    raise record
                records[i] = record
                progress.update()
        names = [k for k in records[0] if k not in ("key", "tstamp")] if records else []
        return {name: [r.get(name) for r in records] for name in names}


# ---------------------------------------------------------------------------------------------------------
# alpaca_eval's annotation cache


def annotation_store(output_dir: Path, config_name: str, annotators: dict, client: dict | None,
                     parallel: int) -> tuple[Path, object]:
    """(alpaca_eval's annotation cache file, the decoder it annotates with) for this run: a judge endpoint's
    logged decoder (client None: the rule judge, keyed on its code and on rule_completions', which reads the
    prompt: alignkit.core.code_digest). Rows the cache holds as failed are dropped first."""
    if client is None:  # edit the rule, a constant or helper it uses, or the prompt's reader: annotated again
        from alignkit.core.code_digest import code_fingerprint
        from alignkit.modeling.presets import rule_judge

        judge = {"rule": code_fingerprint(rule_judge), "reader": code_fingerprint(rule_completions)}
    else:
        judge = client["openai_api_base"]
    key = _canonical_hash({"annotators": annotators, "templates": {a: Path(c["prompt_template"]).read_text()
                                                                   for a, c in annotators.items()},
                           "base_url": judge})[:12]
    cache = output_dir / "annotations" / f"{config_name}-{key}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    forget_failed(cache)
    decoder = rule_completions if client is None else LoggedCompletions(
        output_dir / "annotations" / f"requests-{config_name}-{key}.jsonl", client, parallel)
    return cache, decoder


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
