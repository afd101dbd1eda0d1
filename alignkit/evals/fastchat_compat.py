"""The one place alignkit adapts FastChat's MT-Bench judge code (`fschat` 0.2.36) to today's stack.

Install it without its `llm_judge` extra, which pins openai<1:  pip install fschat==0.2.36

alignkit judges with FastChat's own code: its judges (`make_judge_pairwise`: pair-v2, pair-v2-multi-turn,
pair-math-v1 with reference answers), its match building (`make_match`, `make_match_all_pairs`), its match
play (`play_a_match_pair`: both answer orders, g1/g2 verdicts) and its judgment records. Four points of
FastChat do not fit, and are adapted here and nowhere else:

1. `fastchat.llm_judge.common` imports `anthropic` at the top, for Claude judges alignkit never calls. When
   the package is missing, an empty placeholder module stands in for that one import.
2. `common.chat_completion_openai` calls `openai.ChatCompletion`, removed in openai 1.0. It is replaced, while
   judging, by a call through `alignkit.core.llm.ChatClient` (the current client; its retries are bounded by
   max_retries). A request that still fails returns FastChat's own `API_ERROR_OUTPUT`, which FastChat scores
   "error": a judge error is counted as an error, never as a tie.
3. `common.run_judge_pair` sends a judge only when its name is in `OPENAI_MODEL_LIST` (or Anthropic's list)
   and rejects every other name. While judging, that list accepts every name, so any model behind an
   OpenAI-compatible endpoint (vLLM, a local server, another provider) can judge.
4. `make_match` looks reference answers up as `ref_answers[judge.model_name]`, but FastChat's reference
   answers are keyed by the model that wrote them ("gpt-4"). `reference_answers_for` keys them by the judge.
5. `play_a_match_pair` prints a line per match judged ("question: 81, turn: 1, model_1: ..., g1_winner: ...":
   160 a model pair on full MT-Bench), over alignkit's progress bar and its table. While judging, those lines go
   to alignkit's logger at DEBUG (the judgment file holds each verdict); any other print of FastChat's still shows.

`check()` verifies that the FastChat names and signatures these points rely on are still there; it runs
before every use, and tests/test_evaluate.py runs it, so a FastChat release that renames them fails loudly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
import threading
import types

from alignkit import logger

FASTCHAT_VERSION = "0.2.36"
PIP_LINE = f"pip install fschat=={FASTCHAT_VERSION}"
REFERENCE_MODEL = "gpt-4"  # FastChat's reference answers: mt_bench/reference_answer/gpt-4.jsonl

# What alignkit calls or replaces, with the parameters it relies on (checked by `check`).
SIGNATURES = {
    "common.chat_completion_openai": ["model", "conv", "temperature", "max_tokens", "api_dict"],
    "common.run_judge_pair": ["question", "answer_a", "answer_b", "judge", "ref_answer", "multi_turn"],
    "common.play_a_match_pair": ["match", "output_file"],
    "gen_judgment.make_judge_pairwise": ["judge_model", "judge_prompts"],
    "gen_judgment.make_match": ["questions", "models", "model_answers", "judge", "baseline_model", "ref_answers",
                                "multi_turn"],
    "gen_judgment.make_match_all_pairs": ["questions", "models", "model_answers", "judge", "baseline_model",
                                          "ref_answers", "multi_turn"],
}
# Module attributes alignkit reads or patches.
NAMES = ["common.OPENAI_MODEL_LIST", "common.API_ERROR_OUTPUT", "common.NEED_REF_CATS", "common.temperature_config",
         "common.Judge", "common.MatchPair"]
# Code in FastChat's functions that the adaptations above assume (point number in the module docstring).
SOURCE = {
    "common": ["import anthropic"],  # 1
    "common.run_judge_pair": ["model in OPENAI_MODEL_LIST", "chat_completion_openai(", "set_system_message"],  # 2, 3
    "gen_judgment.make_match": ["ref_answers[judge.model_name]"],  # 4
    "gen_judgment.make_match_all_pairs": ["ref_answers[judge.model_name]"],  # 4
}

_modules: tuple | None = None
_judging = threading.Lock()  # the patches are module-wide: one judging run at a time per process


class FastChatChanged(RuntimeError):
    """The installed fschat no longer has what alignkit's adaptation relies on."""


@contextlib.contextmanager
def _placeholder(name: str):
    """An empty module `name` during an import that needs it only to exist (point 1)."""
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        yield
        return
    module = types.ModuleType(name, f"placeholder set by alignkit.evals.fastchat_compat: {name} is not installed")
    sys.modules[name] = module
    try:
        yield
    finally:
        if sys.modules.get(name) is module:  # leave no fake package behind for other code to trip on
            del sys.modules[name]


def load():
    """(fastchat.llm_judge.common, fastchat.llm_judge.gen_judgment), imported once and checked."""
    global _modules
    if _modules is None:
        from alignkit.core.extras import require

        require("fastchat", "eval", "MT-Bench judging (FastChat's judge code)")  # one line naming the install
        with _placeholder("anthropic"):
            from fastchat.llm_judge import common, gen_judgment
        check(common, gen_judgment)
        _modules = (common, gen_judgment)
    return _modules


def check(common=None, gen_judgment=None) -> None:
    """Raise FastChatChanged naming every adapted FastChat name that is missing or changed."""
    if common is None or gen_judgment is None:
        common, gen_judgment = load()
    modules = {"common": common, "gen_judgment": gen_judgment}
    problems = []

    def resolve(dotted):
        module, _, attr = dotted.partition(".")
        obj = modules[module]
        return getattr(obj, attr) if attr else obj

    for dotted in NAMES:
        if not hasattr(modules[dotted.split(".")[0]], dotted.split(".")[1]):
            problems.append(f"{dotted} is missing")
    for dotted, params in SIGNATURES.items():
        try:
            found = list(inspect.signature(resolve(dotted)).parameters)
        except (AttributeError, TypeError, ValueError):
            problems.append(f"{dotted} is missing")
            continue
        if found != params:
            problems.append(f"{dotted}({', '.join(found)}) no longer takes ({', '.join(params)})")
    for dotted, snippets in SOURCE.items():
        try:
            source = inspect.getsource(resolve(dotted))
        except (AttributeError, TypeError, OSError):
            problems.append(f"{dotted}: source not readable")
            continue
        problems += [f"{dotted} no longer contains {s!r}" for s in snippets if s not in source]
    if problems:
        import fastchat

        raise FastChatChanged(
            f"fschat {getattr(fastchat, '__version__', '?')} differs from the {FASTCHAT_VERSION} that "
            f"alignkit/evals/fastchat_compat.py adapts: {'; '.join(problems)}. Install the supported version: "
            f"{PIP_LINE}"
        )


class _EveryName(tuple):
    """A model list that holds every name: routes any judge to the OpenAI-compatible call (point 3)."""

    def __contains__(self, name) -> bool:
        return True


@contextlib.contextmanager
def judging_with(client, on_error=None, on_success=None, kept=None, reuse: bool = True):
    """While open, FastChat sends every judge request through `client` (an alignkit.core.llm.ChatClient).

    on_error(exception) is called for each request that failed after the client's own retries (it may raise to stop
    the judging), on_success() for each that came back.
    kept: a JSONL file that keeps every answer as it arrives, keyed by its request (the messages and the endpoint:
    alignkit.feedback.judge.endpoint_identity). A match is asked in both orders and its verdict written once both
    came back: a Ctrl-C between them lost the paid first, and its rerun asked for it again. reuse: False asks again
    (--retry_parse_failures: a kept answer without a verdict would be read the same way). Within the run, a request
    sent once is not sent again: two equal answers make the same request in both orders; and one under way in
    another thread (--parallel) is waited for, not sent beside it.
    """
    import threading

    import openai

    from alignkit.core.digests import digest
    from alignkit.core.journal import append_jsonl, read_jsonl, stopping
    from alignkit.feedback.judge import endpoint_identity

    common, _ = load()
    endpoint = endpoint_identity(client)
    answers = {row.get("key"): row["text"] for _, row in read_jsonl(kept, "delete the line", repair_tail=True)
               if isinstance(row.get("text"), str)} if kept is not None and reuse else {}
    in_flight: dict[str, threading.Lock] = {}  # a lock per request: one thread sends it, the others wait for it
    guard = threading.Lock()

    def chat_completion_openai(model, conv, temperature, max_tokens, api_dict=None):  # point 2
        # Temperature and answer length are the client's (--judge_temperature, --judge_max_tokens), whose defaults
        # are FastChat's (0 and 2048), since FastChat hard-codes them.
        messages = conv.to_openai_api_messages()
        key = digest({"messages": messages, **endpoint}, 16)
        with guard:
            flight = in_flight.setdefault(key, threading.Lock())
        with flight:  # the same request under way in another thread: its answer, when it comes
            if key in answers:  # paid for by a run that stopped before the match's verdict, or earlier in this one
                if on_success is not None:
                    on_success()
                return answers[key]
            if stopping():  # Ctrl-C: a match under way sends no second order (its first is kept; a rerun asks this)
                return common.API_ERROR_OUTPUT
            try:
                text = client.complete(messages)
            except (openai.APIError, ValueError, LookupError) as e:  # also a 200 whose body is not JSON, no choices
                if on_error is not None:
                    on_error(e)
                return common.API_ERROR_OUTPUT
            if kept is not None:
                append_jsonl(kept, [{"key": key, "text": text}])
            answers[key] = text  # the same request again in this run (a match of two equal answers, both ways)
        if on_success is not None:
            on_success()
        return text

    with _judging:
        saved = common.chat_completion_openai, common.OPENAI_MODEL_LIST
        common.chat_completion_openai, common.OPENAI_MODEL_LIST = chat_completion_openai, _EveryName(saved[1])
        common.print = _match_line  # point 5: found before the builtin by FastChat's functions, in no other module
        try:
            yield common
        finally:
            common.chat_completion_openai, common.OPENAI_MODEL_LIST = saved
            del common.print


def _match_line(*args, **kwargs) -> None:
    """FastChat's print while judging (point 5): its line per match to the log at DEBUG, anything else printed."""
    text = " ".join(map(str, args))
    if text.startswith("question: ") and kwargs.get("file") is None:
        logger.debug(f"fastchat: {text}")
    else:
        print(*args, **kwargs)


def reference_answers_for(judge_model: str, reference_answers: dict) -> dict:
    """FastChat's `ref_answers` argument: the reference answers keyed by the judge's name (point 4)."""
    return {judge_model: reference_answers}


def judges(judge_model: str, judge_prompts: dict) -> dict:
    """FastChat's pairwise judges: default (pair-v2), math (pair-math-v1, with references), and their -mt."""
    _, gen_judgment = load()
    return gen_judgment.make_judge_pairwise(judge_model, judge_prompts)


def make_matches(questions, models, answers, judge, mode: str, baseline: str | None, ref_answers=None,
                 multi_turn: bool = False) -> list:
    """FastChat's MatchPair list: each model against the baseline, or every pair (model_1 listed first)."""
    _, gen_judgment = load()
    make = gen_judgment.make_match if mode == "pairwise-baseline" else gen_judgment.make_match_all_pairs
    return make(questions, models, answers, judge, baseline, ref_answers=ref_answers, multi_turn=multi_turn)


def play(match) -> dict:
    """Judge one match in both orders with FastChat's play_a_match_pair; its judgment record (not written)."""
    common, _ = load()
    if not isinstance(common.OPENAI_MODEL_LIST, _EveryName):
        raise RuntimeError("fastchat_compat.play runs inside `with judging_with(client):`")
    return common.play_a_match_pair(match, output_file=None)


def log_version() -> None:
    import fastchat

    version = getattr(fastchat, "__version__", "?")
    if version != FASTCHAT_VERSION:
        logger.info(f"fschat {version} installed; alignkit's adaptation targets {FASTCHAT_VERSION} ({PIP_LINE})")
