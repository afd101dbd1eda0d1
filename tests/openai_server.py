"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions API, for offline tests.

    with FakeOpenAI(lambda request: "[[A]]") as server:
        client = ChatClient("judge", base_url=server.base_url)   # the real `openai` client underneath

The responder gets the request's JSON body and returns the assistant's text, or a `Fault` to inject an
HTTP error (429 with Retry-After, 500), a delay longer than the client's timeout, or a body that is not JSON.
It may also return a `Reply`: text with the token log-probs the API sends when asked (`logprobs: true`,
`top_logprobs`), e.g. `Reply("m", logprobs=top_logprobs({"m": 0.8, "M": 0.2}))`.
Every request is recorded in `server.requests`, so tests can count what was sent.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Fault:
    status: int = 500
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a timeout when above the client's)
    body: str = '{"error": {"message": "injected fault", "type": "server_error"}}'


@dataclass
class Reply:
    """An answer with the choice's `logprobs` object ({"content": [per-token entries]}), as the API sends it."""

    text: str
    logprobs: dict | None = None


def top_logprobs(probs: dict[str, float], token: str | None = None) -> dict:
    """A one-token choice.logprobs: `token` (default: the likeliest) with `probs` as its top_logprobs."""
    tops = [{"token": t, "logprob": math.log(max(p, 1e-12)), "bytes": list(t.encode())} for t, p in probs.items()]
    token = token or max(probs, key=probs.get)
    chosen = next(t for t in tops if t["token"] == token)
    return {"content": [{**chosen, "top_logprobs": tops}]}


def completion(text: str, model: str = "fake", prompt_tokens: int = 10, completion_tokens: int = 5,
               logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class FakeOpenAI:
    def __init__(self, responder: Callable[[dict], "str | Fault"], latency: float = 0.0):
        self.responder, self.latency = responder, latency
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                if server.latency:
                    time.sleep(server.latency)
                answer = server.responder(body)
                if isinstance(answer, Fault):
                    time.sleep(answer.delay)
                    status, headers, payload = answer.status, answer.headers, answer.body.encode()
                elif isinstance(answer, Reply):
                    status, headers = 200, {}
                    payload = json.dumps(completion(answer.text, body.get("model", "fake"),
                                                    logprobs=answer.logprobs)).encode()
                else:
                    status, headers = 200, {}
                    payload = json.dumps(completion(answer, body.get("model", "fake"))).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    for key, value in headers.items():
                        self.send_header(key, str(value))
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)


class SilentServer:
    """A server that accepts connections and never answers (a proxy forwarding nowhere, a model still loading):
    `connections` counts what the client opened."""

    def __init__(self):
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self._held: list = []
        self.base_url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/v1"

    def _accept(self):
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed
                return
            self._held.append(connection)

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._socket.close()
        for connection in self._held:
            connection.close()

    @property
    def connections(self) -> int:
        return len(self._held)
