"""The environment layer of the settings (alignkit.core.args.parse_config): ALIGNKIT_<NAME> for every setting, a
bare <NAME> for the few the seed project documented, and every other ALIGNKIT_ variable accounted for: a setting
of another script is named in a log line, one that no script reads is an unknown setting.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import logging
import os

logger = logging.getLogger("alignkit")

ENV_PREFIX = "ALIGNKIT_"
# ALIGNKIT_ variables that are no setting: the cache folder, --debug, offline MT-Bench data, --config, the tests',
# progress bars drawn where no terminal shows (alignkit.core.progress.FORCE_LIVE: rlaif.py's steps, a batch job), a
# step of rlaif.py and the words it goes on in (alignkit.core.errors STEP_OF, STEP_AGAIN).
ENV_NOT_SETTINGS = frozenset({"CACHE", "DEBUG", "OFFLINE", "CONFIG", "TEST_CACHE", "PROGRESS", "STEP", "STEP_AGAIN"})
# Every script's settings class (alignkit.core.config registers them): a variable set for another script (a shell
# exporting ALIGNKIT_DPO_BETA for a whole pipeline) is not a mistake in this one.
SETTINGS_CLASSES: list[type] = []
# The settings the seed project documented under bare names (README, notebooks: `DPO_BETA=0.1 python dpo.py`,
# `PRESET=tiny`): still read without the prefix. Every other setting needs ALIGNKIT_<NAME>.
BARE_ENV_NAMES = frozenset({"PRESET", "MODEL_ID", "DATASET_ID", "DPO_BETA", "MAX_STEPS", "ROUNDS", "MAX_PROMPTS",
                            "NUM_SAMPLES"})
# While parse_config builds a settings object, where each value given came from: {field: (kind, label)}, kind one of
# "env" (the environment or .env), "recipe" (--config), "cli", "overrides"; a field absent has its default or the
# preset's. None outside parse_config: a settings class built directly, whose every value is its caller's.
SETTING_SOURCES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("alignkit_setting_sources",
                                                                             default=None)
# True while a script parses another's settings to check them (rlaif.py its steps' command lines, which pass the
# environment's values on as flags): the environment's log lines are its own parse's, and each step's process says
# its own in its log. The variables are read, and refused, as ever.
ENV_UNSAID: contextvars.ContextVar[bool] = contextvars.ContextVar("alignkit_env_unsaid", default=False)


@contextlib.contextmanager
def environment_unsaid():
    """parse_config within says nothing of the environment (ENV_UNSAID)."""
    token = ENV_UNSAID.set(True)
    try:
        yield
    finally:
        ENV_UNSAID.reset(token)


def read_environment(names, env_from_file, env_file):
    """{name: raw value} from ALIGNKIT_<NAME> (any setting) or a bare <NAME> (BARE_ENV_NAMES only), with a label
    for each (log_environment names them once the layers above are read). A bare name from .env that is not read
    gets a warning: it was meant."""
    found, labels, ignored = {}, {}, []
    # ALIGNKIT_DEBUG is the traceback switch, never TRL's `debug` field (a DebugOption: "1" failed the run).
    for n in (n for n in dict.fromkeys(names) if n.upper() not in ENV_NOT_SETTINGS):
        for var in (f"{ENV_PREFIX}{n.upper()}", n.upper()):
            if var in os.environ and (var.startswith(ENV_PREFIX) or var in BARE_ENV_NAMES):
                found[n] = os.environ[var]
                labels[n] = f"env var {var}" + (f" (from {env_file})" if var in env_from_file else "")
                break
            if var == n.upper() and var in env_from_file:
                ignored.append(var)
    if ignored and not ENV_UNSAID.get():
        logger.warning(f"{env_file}: not read: {', '.join(ignored)} (bare names are read only for "
                       f"{', '.join(sorted(BARE_ENV_NAMES))}); write {ENV_PREFIX}{ignored[0]} instead")
    return found, labels


def log_environment(found, labels, target, above) -> None:
    """One line naming the settings taken from the environment: those that took effect, and those a layer above
    (a recipe, a flag, overrides) set again, by that layer. `target(name)` is (the field the name sets, its
    --trainer_overrides key or None); `above` is [(translated layer, where)], lowest first."""
    def keys(value):
        return set(value) if isinstance(value, dict) else set()

    used, again = [], {}
    for n in found:
        field, key = target(n)
        named = f"{n} ({labels[n].removeprefix('env var ')})"
        by = [w for layer, w in above if field in layer and (key is None or key in keys(layer[field]))]
        if key is None and by and all(isinstance(layer[field], dict) for layer, w in above if w in by):
            # a mapping (trainer_overrides, dataset_mixture) is merged key by key: its keys set above alone yield
            used.append(f"{named[:-1]}, merged with {by[-1]}'s keys)")
            continue
        (again.setdefault(by[-1], []) if by else used).append(named)
    if found and not ENV_UNSAID.get():
        logger.info("settings from the environment: " + "; ".join(
            [", ".join(used) or "none used"] + [f"set again by {w}, whose value is used: {', '.join(names)}"
                                                for w, names in again.items()]))


def stray_variables(names, env_from_file, env_file) -> list[str]:
    """The ALIGNKIT_ variables no script reads (a typo, or a setting that is gone), each as an unknown-setting
    entry; the ones another script reads, named in one log line. Before this, both were silently ignored."""
    mine = {n.upper() for n in names} | ENV_NOT_SETTINGS
    strays = [v for v in sorted(os.environ) if v.startswith(ENV_PREFIX) and v[len(ENV_PREFIX):] not in mine]
    if not strays:
        return []
    every = set()
    for cls in SETTINGS_CLASSES:
        every.update(f.name.upper() for f in dataclasses.fields(cls))
        if hasattr(cls, "vocabulary"):
            every.update(n.upper() for n in cls.vocabulary().cli_types())
    others = [v for v in strays if v[len(ENV_PREFIX):] in every]
    if others and not ENV_UNSAID.get():
        logger.info(f"not read by this script (settings of other alignkit scripts): {', '.join(others)}")
    unknown = []
    for var in (v for v in strays if v not in others):
        close = difflib.get_close_matches(var[len(ENV_PREFIX):], sorted((mine | every) - ENV_NOT_SETTINGS), n=1)
        where = env_file if var in env_from_file else "the environment"
        unknown.append(f"{var} (in {where}" + (f"; did you mean {ENV_PREFIX}{close[0]}?)" if close else ")"))
    return unknown
