"""What rlaif.py hands each round's scripts, and what each step reads (alignkit.train.rlaif): each step's command
line (built once, for the round and for the check before round 1), the policy's loader
settings and the judge endpoint as label.py / evaluate.py flags, the DPO settings as a dpo.py --config, and each
step's inputs by content (the model down its adapter chain, the prompts and preferences files, the judges' code or
model, files named in --label_args / --evaluate_args), whose digest decides whether a step is reused; and the
evaluation prompts file every round is judged on (eval_prompts).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import fields
from pathlib import Path

from alignkit import logger
from alignkit.core.args import redact
from alignkit.core.errors import UserError
from alignkit.core.saved_settings import config_to_dict
from alignkit.core.digests import digest
from alignkit.core.journal import write_atomic

# RLAIFSettings' own fields and the run folder: everything else is a DPO setting handed to every dpo.py run.
# --revision and --gguf_file name the starting model only: round 1 gets it as one model_id (start_model) and
# --revision on the command line, a later policy is a run folder that records its base's.
_NOT_DPO = {"model_id", "reference_adapters", "dataset_id", "output_dir", "run_name", "preset", "eval_split",
            "push_to_hub", "hub_repo_id", "hub_public", "merge_adaptors", "revision", "gguf_file"}
# The policy's loader settings that label.py and evaluate.py get too (the model samples and is judged as it is
# trained); the model itself, its revision and its GGUF file come per round, and --quantization each script resolves
# for itself (4-bit for training on a GPU, none for inference).
_PER_ROUND = {"model_id", "revision", "gguf_file", "quantization"}
# Judge endpoint settings that change how fast or with which key a judge is asked, not what it answers.
_NOT_ANSWERS = {"parallel", "max_retries", "request_timeout", "judge_api_key_env"}


def _dpo_config(s, path: Path) -> None:
    """The DPO settings of this run as a dpo.py --config YAML (None values left to dpo.py's defaults)."""
    import yaml

    write_atomic(path, yaml.safe_dump(_dpo_values(s), sort_keys=True))


def _dpo_values(s) -> dict:
    from alignkit.core.config import DPOSettings

    names = {f.name for f in fields(DPOSettings)} - _NOT_DPO
    values = {k: v for k, v in config_to_dict(s).items() if k in names - {"dataset_config"} and v is not None}
    return {**values, "dataset_split": "train"}  # the prompts' split is label.py's; the preferences file has none


def start_model(s) -> str:
    """The model round 1 starts from, as one name every script loads without --gguf_file (FOLDER/FILE.gguf or
    OWNER/REPO/FILE.gguf for a GGUF; alignkit.modeling.gguf.source_id)."""
    from alignkit.modeling.gguf import source_id

    return source_id(s.model_id, s.gguf_file)


def revision_of(s, policy: str) -> str | None:
    """--revision is the starting model's, when that is a Hub model; a later policy is a run folder (its adapter
    records its base's revision)."""
    return s.revision if policy == start_model(s) and not Path(policy).exists() else None


def loader_values(s) -> dict:
    """The policy's loader settings (alignkit.core.groups.ModelSettings) that differ from their defaults, but
    the model itself: label.py and evaluate.py compose the same group, so every one passes through as it is; and
    --chat_template_kwargs where set (the policy samples and is judged so, and label.py's rows carry it to dpo.py)."""
    from alignkit.core.groups import ModelSettings

    values = {f.name: getattr(s, f.name) for f in fields(ModelSettings)
              if f.name not in _PER_ROUND and getattr(s, f.name) != f.default}
    return {**values, **({"chat_template_kwargs": s.chat_template_kwargs} if s.chat_template_kwargs else {})}


def loader_flags(s) -> list[str]:  # a bool as true/false, a mapping as JSON
    return [f"--{name}={json.dumps(v) if isinstance(v, (bool, dict)) else v}" for name, v in loader_values(s).items()]


def endpoint_flags(s, skip: set[str] = frozenset()) -> list[str]:
    """The judge endpoint group (alignkit.core.config.JudgeEndpointSettings) as label.py / evaluate.py flags:
    both scripts compose the same group, so every field passes through as it is."""
    from alignkit.core.config import JudgeEndpointSettings

    flags = []
    for f in fields(JudgeEndpointSettings):
        value = getattr(s, f.name)
        if f.name not in skip and value is not None:
            flags += [f"--{f.name}", str(value)]
    return flags


def label_judge_flags(s) -> list[str]:
    """endpoint_flags for label.py's --judge: a `python:` or `rm:` judge asks no endpoint, so only --parallel (its
    threads) applies; the logged command named an API key variable and retries that nothing used. A local `hf`
    judge reads no endpoint's URL or key either, which label.py refuses (LabelSettings.check_judge_reads): an
    evaluation judge's --judge_base_url stays evaluate.py's."""
    return endpoint_flags(s, skip=_label_judge_skips(s))


def _label_judge_skips(s) -> frozenset[str]:
    """The judge endpoint settings label.py's --judge is not given (label_judge_flags), and so not among its inputs
    (_label_inputs): an evaluation endpoint changed does not relabel a round whose judge never asked it."""
    from alignkit.core.config import JudgeEndpointSettings

    if s.judge.startswith(("python:", "rm:")):
        return frozenset(f.name for f in fields(JudgeEndpointSettings)) - {"parallel"}
    return frozenset({"judge_base_url", "judge_api_key_env"} if s.judge == "hf" else ())


# ---------------------------------------------------------------------------------------------------------
# Each step's command line: what a round runs, and what the settings check before round 1 parses (one source)


def label_command(s, r: int, policy: str, revision: str | None, preferences: Path) -> list[str]:
    """label.py's arguments in round r: sample from `policy`, judge every pair into `preferences`."""
    args = ["--model_id", policy, "--prompts", s.dataset_id, "--num_samples", str(s.num_samples),
            "--temperature", str(s.sample_temperature), "--max_new_tokens", str(s.max_new_tokens),
            "--judge", s.judge, "--output", str(preferences), "--seed", str(s.seed + r),
            "--quantization", s.quantization]
    if s.max_prompts is not None:
        args += ["--max_prompts", str(s.max_prompts)]
    if s.skip_invalid:  # its prompts' rows, as dpo.py skips its pairs'
        args += ["--skip_invalid", "true"]
    args += [item for k, v in _prompt_source(s).items() if v is not None for item in (f"--{k}", str(v))]
    at_revision = ["--revision", revision] if revision else []
    return args + at_revision + loader_flags(s) + label_judge_flags(s) + shlex.split(s.label_args)


def dpo_command(s, here: Path, policy: str, revision: str | None, preferences: Path, reference: list[str],
                restart: list[str]) -> list[str]:
    """dpo.py's arguments in the round folder `here`: its settings in here/dpo_config.yaml (_dpo_config), the
    adapter into here/dpo."""
    return ["--config", str(here / "dpo_config.yaml"), "--model_id", policy,
            *(["--revision", revision] if revision else []), "--dataset_id", str(preferences), "--output_dir",
            str(here), "--run_name", "dpo", "--eval_split", str(s.eval_split), *reference, *restart]


def eval_command(s, r: int, policy: str, revision: str | None, dpo: Path, evaluation: Path, prompts: str,
                 judge: str | None, answers_from: Path | None) -> list[str]:
    """evaluate.py's arguments in round r: pairwise, the new policy `dpo` against `policy` on `prompts`."""
    previous = f"{policy}@{revision}" if revision else policy  # ID@REVISION: alignkit.core.sources
    args = ["pairwise", "--models", f"previous={previous}", f"round-{r}={dpo}", "--baseline", "previous",
            "--prompts_file", prompts, "--output_dir", str(evaluation),
            "--max_new_tokens", str(s.max_new_tokens), "--temperature", str(s.sample_temperature),
            "--quantization", s.quantization, "--seed", str(s.seed)]
    if answers_from is not None:  # the previous policy answered these prompts there, as its new one: by key
        args += ["--answers_from", str(answers_from)]
    endpoint = [] if judge == "rule" else endpoint_flags(s, skip={"judge_model"})
    if judge:
        args += ["--judge_model", judge]
    return args + loader_flags(s) + endpoint + shlex.split(s.evaluate_args)


# ---------------------------------------------------------------------------------------------------------
# What each step reads


def _digest(value) -> str:
    return digest(value, 16, ensure_ascii=True)


def _model(source: str, revision: str | None = None) -> str:
    """A model by content, down its adapter chain: a folder retrained in place is another model."""
    from alignkit.modeling.identity import chain_identity

    return _digest(chain_identity(str(source), revision))


def _data(source: str):
    """A prompts (or preferences) file by its content, a local folder by its files', a Hub dataset by its id."""
    from alignkit.modeling.identity import data_identity

    return data_identity(source) or source


def _judge(spec: str | None):
    """label.py's --judge or evaluate.py's --judge_model, with what it names by content: a reward model (rm:FOLDER),
    code (python:MODULE:FUNCTION or python:FILE.py:FUNCTION, as label.py keys it), the rule judge evaluate.py runs
    (given no --preset: the tiny one's)."""
    from alignkit.core.code_digest import code_fingerprint
    from alignkit.modeling.presets import judge
    from alignkit.train.named_files import spec_identity

    if spec == "rule":
        return [spec, code_fingerprint(judge(None))]
    if spec and spec.startswith("rm:") and Path(spec[3:]).exists():  # the form rounds recorded before: they stand
        return [spec, _model(spec[3:])]
    found = spec_identity(spec, "--judge") if spec else None
    return [spec, found] if found is not None else spec


def same_inputs(before: dict, now: dict) -> bool:
    """A step's recorded inputs are these, a local judge (python:, rm:) compared by what it is: the function by its
    name and its code's fingerprint, the reward model by its content; not by how its path was spelled (./judge.py,
    judge.py, an absolute path, a copied folder), which relabelled, retrained and judged again a whole round. Read
    from the records alone: no judge's code is imported to compare."""
    return _by_what_it_is(before) == _by_what_it_is(now)


def _by_what_it_is(inputs: dict) -> dict:
    out = dict(inputs)
    for name in ("judge", "judge_model"):
        value = out.get(name)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[1] is not None):
            continue
        spec = value[0]
        if spec.startswith("rm:"):
            out[name] = ["rm", value[1]]
        elif spec.startswith("python:"):  # its function's name, as import_function reads it; the code's by content
            from alignkit.feedback.judge import split_spec

            out[name] = ["python", split_spec(spec)[1], value[1]]
    return out


def _endpoint(s, skip: set[str] = frozenset()) -> dict:
    """The judge endpoint settings that can change an answer (the server called, the model there)."""
    from alignkit.core.config import JudgeEndpointSettings

    out = {f.name: getattr(s, f.name) for f in fields(JudgeEndpointSettings) if f.name not in _NOT_ANSWERS | skip}
    if "judge_base_url" in out:
        out["judge_base_url"] = out["judge_base_url"] or os.environ.get("OPENAI_BASE_URL")
    if out.get("judge_model") and Path(out["judge_model"]).exists():  # a local judge (--judge hf) by content
        out["judge_model"] = [out["judge_model"], _model(out["judge_model"])]
    return out


def _loader(s) -> dict:
    """The loader settings that can change an answer, only where set (a run at the defaults keeps its digests)."""
    from alignkit.modeling.identity import INERT

    values = {k: v for k, v in loader_values(s).items() if k not in INERT}
    if values.get("chat_template"):
        from alignkit.core.groups import chat_template_text

        values["chat_template"] = chat_template_text(values["chat_template"])  # a template file by its text
    return {"loader": values} if values else {}


def _prompt_source(s) -> dict:
    """How label.py reads --dataset_id, beyond its content: the split and configuration of a dataset that has
    splits, and a prompt column other than "prompt" (only where they apply: older rounds keep their digests)."""
    from alignkit.core.data_files import single_file

    out = {} if single_file(s.dataset_id) else {"prompts_split": s.dataset_split, "prompts_config": s.dataset_config}
    return {**out, **({"prompt_field": s.prompt_field} if s.prompt_field != "prompt" else {})}


def _named_in(args: str | None, flag: str) -> dict:
    """{"FLAG_files": {token: its content}} for the tokens of an extra-arguments string (--label_args, ...) naming a
    local file, code (python:) or a reward model (rm:): a judge template passed there, edited in place, is another
    step; nothing where they name none, so a round recorded before keeps its inputs."""
    from alignkit.train.named_files import spec_identity

    named = {}
    for token in shlex.split(args or ""):
        token = token.partition("=")[2] if token.startswith("--") else token  # --judge_template=FILE
        if token.startswith(("python:", "rm:")) or token and Path(token).is_file():
            if (found := spec_identity(token, flag)) is not None:
                named[token] = found
    return {f"{flag.lstrip('-')}_files": named} if named else {}


def _label_inputs(s, r: int, policy: str, revision: str | None) -> dict:
    return {"policy": _model(policy, revision), "prompts": _data(s.dataset_id), **_prompt_source(s), **_loader(s),
            "num_samples": s.num_samples, "sample_temperature": s.sample_temperature, "max_prompts": s.max_prompts,
            "max_new_tokens": s.max_new_tokens, "judge": _judge(s.judge), "seed": s.seed + r,
            "quantization": s.quantization, **_endpoint(s, skip=_label_judge_skips(s)), "label_args": redact(s.label_args),
            **_named_in(s.label_args, "--label_args")}


def _dpo_inputs(s, policy: str, revision: str | None, preferences: Path, reference: list[str]) -> dict:
    from alignkit.modeling.identity import INERT
    from alignkit.train.named_files import spec_identity
    from alignkit.train.run_folder import NOT_TRAINING  # the settings that do not change what is trained

    values = {k: v for k, v in _dpo_values(s).items() if k not in NOT_TRAINING and k not in INERT}
    values.update(_loader(s).get("loader", {}))  # --chat_template by its text
    for name in ("lota_mask", "lota_exclude_mask"):  # a mask by its content (one file, or a run folder's files)
        if values.get(name) and (found := spec_identity(values[name], f"--{name}")) is not None:
            values[f"{name}_content"] = found
    return {**values, "policy": _model(policy, revision),
            "preferences": _data(str(preferences)), "reference": s.reference, "reference_adapters": reference,
            "eval_split": s.eval_split}


def _eval_inputs(s, policy: str, revision: str | None, dpo: Path, judge: str | None, prompts: str) -> dict:
    return {"policy": _model(policy, revision), "adapter": _model(str(dpo)), **_loader(s), "prompts": _data(prompts),
            "judge_model": _judge(judge), "max_new_tokens": s.max_new_tokens, "temperature": s.sample_temperature,
            "quantization": s.quantization, "seed": s.seed,
            **({} if judge == "rule" else _endpoint(s, skip={"judge_model"})), "evaluate_args": redact(s.evaluate_args),
            **_named_in(s.evaluate_args, "--evaluate_args")}


# ---------------------------------------------------------------------------------------------------------
# The evaluation prompts, written once before round 1


EVAL_PROMPTS = "eval_prompts.jsonl"  # in the run folder: the evaluation prompts, when read from a dataset


def eval_prompts(s, folder: Path | None) -> str | None:
    """The prompts file each round is judged on, ready before round 1 (a prompt that cannot be judged is found
    before hours of labelling and training, not after).

    The source is --eval_prompts, else --dataset_id. A JSONL of {"prompt": ...} rows or a .txt file is what
    evaluate.py --prompts_file reads, and goes as it is unless a prompt repeats (then its distinct prompts are
    written, _distinct_questions). Any other source (a Hub dataset, a folder, a CSV or
    Parquet file, rows of messages) is read as --dataset_id is read, from --eval_prompts_split (default: the
    --dataset_split with "train" read as "test": a Hub dataset's held-out prompts), its distinct prompts, at most
    --eval_max_prompts, into EVAL_PROMPTS in the run folder. evaluate.py pairwise judges one-turn prompts, so a
    prompt of several turns, or with a system turn, is refused naming its row. `folder` None: read and checked
    only, nothing written (check)."""
    from alignkit.core.data_files import DataError, single_file
    from alignkit.evals.prompts_file import prompt_questions
    from alignkit.feedback.labeling import read_prompts

    source = s.eval_prompts or s.dataset_id
    one_file = single_file(source)
    if s.eval_max_prompts is None and one_file:
        try:
            questions = prompt_questions(source)
        except UserError:
            questions = None  # another format: read as --dataset_id is read, below
        if questions is not None:
            return _distinct_questions(questions, source, folder)
    split = "train" if one_file else (s.eval_prompts_split or s.dataset_split.replace("train", "test"))
    config = s.dataset_config if source == s.dataset_id else None
    try:
        # read by check() and again by run(): said once, by run()'s "each round is judged on" line
        prompts = read_prompts(source, split, config, s.prompt_field, s.eval_max_prompts, unsaid=True)
    except DataError as e:  # a missing split: say which setting chose it
        if one_file or "no split" not in str(e):
            raise
        raise DataError(f"the evaluation prompts (--eval_prompts_split {split}): {e}") from None
    rows = []
    for prompt in prompts:
        if len(prompt.messages) != 1:
            raise DataError(f"{prompt.place}: a prompt of {len(prompt.messages)} turns "
                            f"({', '.join(m['role'] for m in prompt.messages)}); each round's evaluation (evaluate.py "
                            "pairwise) judges one-turn prompts. Pass --eval_prompts with one-turn prompts")
        rows.append({"question_id": len(rows) + 1, "prompt": prompt.messages[0]["content"]})
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EVAL_PROMPTS
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    logger.info(f"each round is judged on {len(rows)} prompts from {source}"
                + ("" if one_file else f" (split {split})") + f", in {path}")
    return str(path)


def _distinct_questions(questions: list[dict], source: str, folder: Path | None) -> str | None:
    """A prompts file evaluate.py reads, as it is where each prompt is there once; else its distinct prompts (each
    with its first row's question_id and category) into EVAL_PROMPTS in the run folder, as evaluate.py's vibes asks
    a repeated prompt once: each prompt of the tiny preset's 64 rows (29 distinct) was judged as often as it
    repeats, and the bootstrap CI counted the repeats as independent questions (found by an audit)."""
    from alignkit.evals.prompts_file import distinct_questions

    if len(distinct := distinct_questions(questions)) == len(questions):
        return source
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EVAL_PROMPTS
    rows = [{"question_id": q["question_id"], "category": q["category"], "prompt": q["turns"][0]} for q in distinct]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    logger.info(f"each round is judged on {len(rows)} prompts from {source} ({len(questions) - len(rows)} repeated "
                f"ones dropped), in {path}")
    return str(path)
