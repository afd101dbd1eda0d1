"""The files a training run's settings name beside its model and data, by content: what `--resume auto` and rlaif's
rounds compare, so that a file edited in place (a chat template, a reward's code, a reward model trained again, a
judge prompt) starts a new run instead of handing back the one trained under the old file.

A setting value names a file in one of four ways: `python:MODULE:FUNCTION` or `python:FILE.py:FUNCTION` (the
code, as label.py keys a rule judge's verdicts: its module's file and the files it imports from beside it),
`rm:FOLDER` (a reward model: its whole chain, as the loader loads it), `FILE#NAME` (a prompt of a judge prompts
file) or a plain local file or folder. A value that names nothing local (a Hub id, an inline template, a keyword)
is a setting like any other, compared as written.
"""

from __future__ import annotations

from pathlib import Path

# The settings of sft/dpo/kto/reward/rl that may name a file (the model and the data are run_inputs' own).
FILE_SETTINGS = ("chat_template", "judge_template", "reference_completions", "lota_mask", "lota_exclude_mask",
                 "reward")


def spec_identity(spec: str, flag: str):
    """What `spec` (a setting's value) names, by content; None when it names nothing local."""
    from alignkit.modeling.identity import chain_identity, file_hash, folder_files

    kind, _, rest = spec.partition(":")
    if kind == "python":
        from alignkit.core.code_digest import code_fingerprint
        from alignkit.feedback.judge import import_function

        return {"code": code_fingerprint(import_function(spec, flag))}
    if kind == "rm" and Path(rest).exists():
        return {"model": chain_identity(rest)}
    path = Path(spec.partition("#")[0])
    try:
        if path.is_file():
            return {"file": file_hash(path)}
        if path.is_dir():  # a run folder (a LoTA mask's): its files a loader reads, not its checkpoints
            return {"files": folder_files(path)}
    except OSError:  # an inline template: too long a name for a path
        pass
    return None


def named_files(s) -> dict:
    """{setting: {value: its content}} for each FILE_SETTINGS value of `s` that names something local."""
    found = {}
    for name in FILE_SETTINGS:
        value = getattr(s, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        ids = {v: i for v in values if isinstance(v, str) and v and (i := spec_identity(v, f"--{name}")) is not None}
        if ids:
            found[name] = ids
    return found
