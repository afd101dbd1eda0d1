"""One way to call an OpenAI-compatible chat endpoint (OpenAI, vLLM, a local server), for judges and teachers.

The official `openai` client (>= 1) already retries 429s, 5xx answers, connection errors and timeouts with
exponential backoff, honouring Retry-After; `max_retries` bounds it. What this adds: the key from a named
variable, checked before any work starts; no key needed for a local server; usage counted per call; and an
endpoint that never answers is found at its first timeout: until the endpoint has sent any answer, a timeout is
not retried, and the run stops in one line (`EndpointSilent`). Retrying a silent server (a proxy that accepts
and forwards nowhere, a server still loading, a wrong port that holds connections open) cost --request_timeout
times (--max_retries + 1) per request, about 12 minutes at the defaults, before the first failure was even counted.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from alignkit.core.args import ConfigError, redact
from alignkit.core.errors import UserError, run_again
from alignkit.core.secrets import name_secret_variables


@dataclass
class Usage:
    """Tokens and calls so far, safe to update from worker threads."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage) -> None:
        with self._lock:
            self.calls += 1
            if usage is not None:
                self.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
                self.completion_tokens += getattr(usage, "completion_tokens", 0) or 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


def endpoint_key(api_key_env: str = "OPENAI_API_KEY", base_url: str | None = None,
                 what: str = "the endpoint") -> tuple[str, str | None]:
    """(API key, base URL) of an OpenAI-compatible endpoint, checked before any work starts: the one key check.

    A variable named on purpose (not OPENAI_API_KEY) must be set; OPENAI_API_KEY may be missing only for a
    server at a base URL (a local vLLM or llama.cpp accepts any key; the client insists on one). The base URL is
    `base_url`, else OPENAI_BASE_URL, else None (the OpenAI API).
    """
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    name_secret_variables(api_key_env)  # its value is kept out of logs and error lines, whatever the name
    api_key = os.environ.get(api_key_env)
    if not api_key:
        if api_key_env != "OPENAI_API_KEY":
            raise ConfigError(f"{what}: {api_key_env} is not set: put the API key there (or in .env)")
        if base_url is None:  # the OpenAI API itself: no key, no call
            raise ConfigError(f"{what}: {api_key_env} is not set: put the API key there (or in .env), or pass a "
                              "base URL of a server that needs no key")
        api_key = "no-key"
    return api_key, base_url


class EndpointSilent(UserError):
    """The endpoint has not answered any request, and one timed out: every request would wait as long, so the run
    stops (nothing done is lost) rather than retry each."""


SILENT_MARK = "has answered no request yet"  # in every silent endpoint's line (a log filter looks for it)


def watched_http_client(what: str, where: str, timeout: float):
    """(the openai client's HTTP client, the exception it raises for a silent endpoint): openai's own default client
    (httpx, or httpx2 for openai >= 3: its limits, timeouts and the proxies the environment names) whose `send` knows
    whether the endpoint has answered at all. Before its first answer a timeout raises at once, and so does every later
    attempt (the client's own retries included), so no request waits again on a server known silent. After any
    answer, even an error status, the server is alive: a timeout then is retried as the client always did."""
    import sys

    import openai

    base = openai.DefaultHttpxClient
    httpx = sys.modules[next(c for c in base.__mro__ if c.__name__ == "Client").__module__.split(".")[0]]
    state = {"answered": False, "silent": None}  # plain assignments: safe across the request threads
    last = threading.local()  # each request thread's last HTTP status (a caller that only sees "it failed")

    class Silent(openai.OpenAIError):  # an OpenAIError: the client passes it on without retrying (openai >= 2)
        pass

    class Watched(base):
        def send(self, request, **kwargs):
            if state["silent"] and not state["answered"]:
                raise Silent(state["silent"])
            try:
                response = super().send(request, **kwargs)
            except httpx.TimeoutException as error:
                if state["answered"]:
                    raise
                how = "accepted no connection" if isinstance(error, httpx.ConnectTimeout) else \
                    "accepted the connection but sent no answer"
                state["silent"] = f"{what} at {where} {how} in {timeout:g} s (--request_timeout), and {SILENT_MARK}"
                raise Silent(state["silent"]) from None
            state["answered"] = True
            last.status = response.status_code
            return response

    client = Watched()
    client.last_status = lambda: getattr(last, "status", None)  # this thread's last answer's HTTP status
    client.forget_status = lambda: setattr(last, "status", None)
    return client, Silent


@contextmanager
def silence_said(silent: type):
    """Within it, watched_http_client's `silent` exception (older openai clients wrap it in an APIConnectionError,
    after instant retries) comes out as its one line, EndpointSilent; any other error as it is."""
    try:
        yield
    except Exception as error:
        found = next((e for e in (error, error.__cause__) if isinstance(e, silent)), None)
        if found is None:
            raise
        raise EndpointSilent(f"{found}: check that its server is up and serving (its log shows each request; a "
                             "model may still be loading), its URL and port, or raise --request_timeout for a slow "
                             f"model; then {run_again()} (what is done is kept)") from None


class ChatClient:
    """`complete(messages)` -> the answer's text, through `openai.OpenAI(...).chat.completions.create`."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_retries: int = 5, timeout: float = 120.0, temperature: float = 0.0, max_tokens: int = 1024,
                 what: str = "the endpoint"):
        from openai import OpenAI

        api_key, base_url = endpoint_key(api_key_env, base_url, what)
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        named = what.split(" (--")[0]  # "generator openai:m (--generation_api_key_env)": the key is not the point
        http_client, self._silent = watched_http_client(named, base_url or "https://api.openai.com/v1", timeout)
        self.client = OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout,
                             http_client=http_client)
        self.usage = Usage()

    def complete(self, messages: list[dict], **kwargs) -> str:
        import json

        with silence_said(self._silent):
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=openai_messages(messages),
                    temperature=kwargs.pop("temperature", self.temperature),
                    max_tokens=kwargs.pop("max_tokens", self.max_tokens), **kwargs,
                )
            except json.JSONDecodeError as error:  # a page served as JSON (a proxy's, a login's): openai's bare error
                raise NotACompletion(f"{self.client.base_url} answered without a chat completion (a body that is "
                                     f"not JSON: {error}): its URL should be the API's, usually ending in "
                                     "/v1") from None
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:  # a web page, a proxy's error, no JSON
            shown = " ".join(str(response).split())[:120]
            raise NotACompletion(f"{self.client.base_url} answered without a chat completion (got {shown!r}): its "
                                 "URL should be the API's, usually ending in /v1")
        self.usage.add(getattr(response, "usage", None))
        return choices[0].message.content or ""


class NotACompletion(RuntimeError):
    """A 200 answer that holds no chat completion: counted as a failed request, as any other failure."""


def openai_messages(messages: list[dict]) -> list[dict]:
    """Messages as the OpenAI API takes them. alignkit keeps a tool call as the chat templates read it (Hugging Face's
    form: arguments as a mapping, often no id, reasoning beside the text); the API wants each call with an id and its
    arguments as JSON text, a tool turn naming the call it answers (by order when the data gives no ids), and no
    other keys. Plain role/content messages go as they are."""
    import json

    if all(set(m) <= {"role", "content"} for m in messages):
        return messages
    given = {c.get("id") for m in messages for c in m.get("tool_calls") or () if isinstance(c, dict)}
    out, pending, made = [], [], 0
    for m in messages:
        message = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function", call)
                arguments = function.get("arguments")
                if not call.get("id"):  # a new id, none the data already uses
                    made += 1
                    while f"call_{made}" in given:
                        made += 1
                calls.append({"id": call.get("id") or f"call_{made}", "type": "function", "function": {
                    "name": function.get("name"),
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments or {})}})
            pending += [c["id"] for c in calls]
            message["tool_calls"], message["content"] = calls, m["content"] or None
        if m["role"] == "tool":
            answers = m.get("tool_call_id")
            message["tool_call_id"] = answers or (pending[0] if pending else f"call_{made or 1}")
            if message["tool_call_id"] in pending:
                pending.remove(message["tool_call_id"])
        out.append(message)
    return out


def judge_client(s, default_model: str | None = None, what: str = "the judge") -> ChatClient:
    """The chat client of the judge that settings `s` describe (alignkit.core.config.JudgeEndpointSettings, with
    judge_temperature and judge_max_tokens when it has them): the one place a judge's client is made."""
    model = s.judge_model or default_model
    if not model:
        raise ConfigError(f"{what}: pass --judge_model NAME (a model served by the OpenAI-compatible endpoint)")
    return ChatClient(model, s.judge_base_url, s.judge_api_key_env, s.max_retries, s.request_timeout,
                      getattr(s, "judge_temperature", 0.0), getattr(s, "judge_max_tokens", 1024), what)


FIRST_FAILURES = 5  # this many requests failing before any succeeds stop the run (a dead server, a broken rule)
FAILURES_IN_A_ROW = 20  # this many failing one after another stop it later on (a server that went down mid-run)


def _this_request_only(error: Exception) -> bool:
    """A refusal of this request alone (HTTP 4xx other than 429: a context length exceeded, a content filter), which
    says nothing of the server: it neither counts toward stopping the run nor breaks a run of failures."""
    status = getattr(error, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status != 429


class FirstFailures:
    """`total` requests as they come back: stops, in one line, a run whose first FIRST_FAILURES all failed (with
    --max_retries each, a server that is down, or a rule that raises, would otherwise be asked every request, and
    the run end with nothing), or whose last FAILURES_IN_A_ROW failed one after another (a server gone down mid-run
    was asked every request left, and the run ended with "train on it"); a request refused for itself alone (HTTP
    4xx but 429) counts for neither. `what`: "judge request", ...; `fix`: the
    line saying what to check (label_records' judge_fix, ...); a rate limit (HTTP 429) says to lower --parallel.
    `total` None: requests that come as a run goes on (rl.py's judge, step by step), not known ahead; one watch
    sees them all, so a server down from the start stops it at its FIRST_FAILURES-th failure, in any step."""

    def __init__(self, what: str, fix: str, total: int | None):
        self.what, self.fix, self.total = what, fix, total
        self.succeeded, self.failures, self.in_a_row = 0, [], 0
        self._lock = threading.Lock()  # requests may come back on worker threads

    def ok(self) -> None:
        with self._lock:
            self.succeeded += 1
            self.in_a_row = 0
            if self.total is None:  # counted for no `left`: a long run keeps none of its passing failures
                self.failures.clear()

    def failed(self, error: Exception) -> None:
        if isinstance(error, EndpointSilent):  # already its own line: no request would be answered
            raise error
        with self._lock:
            self.failures.append(error)
            if _this_request_only(error):  # a prompt too long, a content filter: the server answers the others
                return
            self.in_a_row += 1
            left = None if self.total is None else self.total - self.succeeded - len(self.failures)
            first_ones = not self.succeeded and self.in_a_row == FIRST_FAILURES
            if (left is not None and left <= 0) or not (first_ones or self.in_a_row == FAILURES_IN_A_ROW):
                return
        which = f"first {FIRST_FAILURES}" if first_ones else f"last {FAILURES_IN_A_ROW}"
        after = "" if first_ones else f", after {self.succeeded} that succeeded,"
        fix = self.fix
        error = next(e for e in self.failures if not _this_request_only(e)) if first_ones else error
        if getattr(error, "status_code", None) == 429 or type(error).__name__ == "RateLimitError":
            fix = ("The server is limiting the rate of requests (HTTP 429): lower --parallel, or wait for its limit to "
                   "reset")
        raise UserError(f"the {which} {self.what}s all failed{after} ({type(error).__name__}: "
                        f"{' '.join(redact(str(error)).split())[:200]}): "
                        f"{'stopped the run' if left is None else f'stopped before the other {left}'}. "
                        f"{fix}, then {run_again()} (what is done is kept)")
