"""How a model is named: a Hub id or a local path, and a Hub id at a revision written ID@REVISION; and whether the
Hub answers for a Hub id (`require_reachable`), or else reading the Hugging Face cache alone
(`cache_alone_if_hub_silent`).

A neutral core module (it imports nothing of alignkit's but errors), so the loader settings
(alignkit.core.groups.loader_settings), the chain of adapters (alignkit.modeling.chain), the Hub upload and the
model card all tell a Hub id from a path one way, and ask the Hub the same way before fetching from it: without
that, an unreachable Hub costs a minute of the libraries' retries and ends in a long traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path

from alignkit.core.errors import UserError

# owner/name or name: letters, digits, - _ . (not first); no "..", no file suffix of a local data file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".yaml", ".yml", ".txt", ".jinja")


def is_hub_id(source) -> bool:
    """True for a Hub repo id (`owner/name` or `name`), False for a local path (existing or path-shaped)."""
    source = str(source or "")
    if not source or Path(source).exists() or ".." in source or source.lower().endswith(_FILE_SUFFIXES):
        return False
    return bool(_HUB_ID.match(source))


def hub_gguf(source) -> tuple[str, str] | None:
    """(repo, NAME.gguf) for a GGUF file of a Hub repo written as one id, `owner/repo/NAME.gguf`; None for anything
    else (a local path, existing or path-shaped, included)."""
    repo, _, name = str(source or "").rpartition("/")
    if not name.lower().endswith(".gguf") or Path(str(source)).exists() or not is_hub_id(repo) or "/" not in repo:
        return None
    if Path(repo.split("/")[0]).is_dir():  # models/q4/x.gguf beside a models/ folder: a local path mistyped
        return None
    return repo, name


def split_revision(source: str) -> tuple[str, str | None]:
    """(model, revision) of a model named as ID@REVISION where a flag names a second model (evaluate.py --models,
    --compare_to, label.py --model_a); (source, None) for anything else, a local path with an @ in it included."""
    model, at, revision = str(source).rpartition("@")
    if at and revision and not Path(source).exists() and is_hub_id(model):
        return model, revision
    return source, None


PROBE_TIMEOUT = 5.0  # seconds: a reachable Hub answers a HEAD well within this; a dead one fails fast


class HubUnreachable(UserError):
    """The Hub is needed for a model or dataset and does not answer."""


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str) -> str | None:
    """None when `endpoint` answers at all (any HTTP status), else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT, follow_redirects=False)
        return None
    except Exception as e:  # noqa: BLE001 - refused, DNS, timeout, proxy: every one means "not reachable"
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def push_unreachable() -> str | None:
    """Why nothing can be pushed to the Hub now (HF_HUB_OFFLINE set, or the Hub does not answer), else None."""
    if hub_offline():
        return "HF_HUB_OFFLINE=1 is set"
    return hub_silent()


def hub_silent() -> str | None:
    """"the Hub at ENDPOINT does not answer (why)" where it does not (asked within seconds), else None."""
    why = _probe(hub_endpoint())
    return f"the Hub at {hub_endpoint()} does not answer ({why})" if why else None


def require_reachable(*sources) -> None:
    """Fail within seconds, with the way out, when a source is a Hub id and the Hub does not answer.

    Offline mode (HF_HUB_OFFLINE=1) asks nothing: the libraries then read their cache alone.
    """
    ids = [str(s) for s in sources if is_hub_id(s) or hub_gguf(s)]
    if not ids or hub_offline():
        return
    endpoint = hub_endpoint()
    why = _probe(endpoint)
    if why:
        raise HubUnreachable(
            f"cannot reach the Hugging Face Hub at {endpoint} ({why}) to fetch {', '.join(ids)} (no local folder "
            "has that name). For models and datasets already in your Hugging Face cache, set HF_HUB_OFFLINE=1; "
            "for the offline demo, run with --preset tiny."
        )


@contextlib.contextmanager
def cache_alone_if_hub_silent(what: str):
    """Where the Hub does not answer (and HF_HUB_OFFLINE is not set), what runs inside reads the Hugging Face cache
    alone, as under HF_HUB_OFFLINE=1 (huggingface_hub's and datasets' switches, restored after): data in the cache
    loads at once, and data not there fails at once. datasets retried a silent Hub for about 90 s first (lm_eval's
    tasks, alignkit.evals.harness.load_tasks: the evaluate audit of session 31). `what`: said in the log line.
    HF_HUB_OFFLINE=1 set after the libraries were imported (os.environ or %env in a notebook) is theirs too inside:
    they read it once, at import, and asked the Hub all the same (datasets' retries, 20 s and more)."""
    import logging

    import datasets.config
    from huggingface_hub import constants

    if not hub_offline():
        if (why := hub_silent()) is None:
            yield
            return
        logging.getLogger("alignkit").info(f"{why}: {what} from this machine's Hugging Face cache alone (as with "
                                           "HF_HUB_OFFLINE=1)")
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
