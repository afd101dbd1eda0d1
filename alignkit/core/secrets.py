"""Secrets kept out of everything alignkit writes or prints: logs, error lines, saved configs, model cards, wandb.

`redact(text)` replaces
- the value of every secret environment variable (HF_TOKEN, OPENAI_API_KEY, any *_TOKEN, *_API_KEY, *_SECRET,
  *_PASSWORD), and of every variable a setting names as holding a key (`--judge_api_key_env MY_KEY`: MY_KEY's
  value; `name_secret_variables`, called when settings are read);
- the credentials in a URL: the user:password (or token) before `@`, and key-like query parameters
  (`?api_key=`, `&token=`, ...), as a judge's `--judge_base_url` or HF_ENDPOINT may carry them.

A neutral module (it imports no alignkit module): the error hook (alignkit.core.errors), the settings layer
(alignkit.core.args) and the logger's filter (alignkit/__init__.py) all use it.
"""

from __future__ import annotations

import os
import re

SECRET_ENV = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY"}
SECRET_SUFFIXES = ("_TOKEN", "_API_KEY", "_SECRET", "_PASSWORD")
# A token as a setting: refused in every script, in one line (alignkit.core.args; TRL's name in the training scripts,
# alignkit.core.trl_tables.REFUSED). TrainingArguments keeps it in every checkpoint's training_args.bin.
TOKEN_SETTINGS = {"hub_token": "a token in a flag or a recipe is kept where it should not be (a training run saves it "
                               "in every checkpoint's training_args.bin, a shell in its history); set HF_TOKEN (or log "
                               "in with `hf auth login`): alignkit reaches the Hub with that"}
_named: set[str] = set()  # variables a setting names as holding a key, whatever they are called

# scheme://user:password@ or scheme://token@ (no scheme: "git@host" and e-mail addresses are no credentials)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]+)(?::(?P<password>[^/\s@]*))?@")
_QUERY_KEY = re.compile(r"(?P<name>[?&](?:api[_-]?key|key|token|access[_-]?token|auth|secret|password|sig|signature)=)"
                        r"[^&\s#\"']+", re.IGNORECASE)


def name_secret_variables(*names: str | None) -> None:
    """Count these variables' values as secrets from now on (a setting such as --judge_api_key_env names them)."""
    _named.update(n for n in names if n)


def secret_values() -> list[str]:
    names = {k for k in os.environ if k.upper() in SECRET_ENV or k.upper().endswith(SECRET_SUFFIXES) or k in _named}
    # Longest first, so a secret that contains another one is hidden whole.
    return sorted({os.environ[k] for k in names if len(os.environ[k]) >= 8}, key=len, reverse=True)


def _userinfo(match: re.Match) -> str:
    if match["password"] is not None:
        return f"{match['scheme']}{match['user']}:***@"
    return f"{match['scheme']}***@"


def redact(text: str) -> str:
    """`text` with every secret value and every URL credential replaced by ``***``."""
    for secret in secret_values():
        text = text.replace(secret, "***")
    if "@" in text:
        text = _USERINFO.sub(_userinfo, text)
    if "=" in text:
        text = _QUERY_KEY.sub(lambda m: m["name"] + "***", text)
    return text
