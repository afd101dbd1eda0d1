"""evaluate.py's own prompts (`--prompts_file`: pairwise's questions, vibes' prompts, rlaif.py's evaluation
prompts) read as single-turn questions in MT-Bench's shape, each bad row named by file, line and field."""

from __future__ import annotations

import codecs
from pathlib import Path

from alignkit.core.args import ConfigError
from alignkit.core.journal import read_jsonl
from alignkit.evals.mtbench import field_value

_PROMPTS_FORMATS = ('--prompts_file takes JSONL (one {"prompt": ...} object a line) or a .txt file (one prompt a '
                    'line)')
_PROMPTS_FIXES = {
    "prompt": 'each row needs "prompt": a non-empty string',
    "question_id": 'give every row its own integer "question_id", or leave the field out (rows are then numbered '
                   '1, 2, ...)',
    "category": 'make "category" a string, or leave it out (the row then counts under "prompts")',
}


def _prompts_format(path, data: bytes) -> None:
    """A JSON array or a table as --prompts_file: an error naming the formats it takes, not "not valid JSON"."""
    if data.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"[":
        raise ConfigError(f"{path}: holds a JSON array; {_PROMPTS_FORMATS}: write each object on a line of its own")
    if path.suffix.lower() in (".csv", ".tsv", ".parquet"):
        raise ConfigError(f"{path}: a {path.suffix.lower()[1:].upper()} file; {_PROMPTS_FORMATS}")


def distinct_questions(questions: list[dict]) -> list[dict]:
    """Each prompt once, as its first row (its question_id and category): a prompt judged as often as it repeats
    counted its repeats as independent questions in the bootstrap CI (evaluate.py pairwise; rlaif.py's rounds; vibes
    asks a repeated prompt once too)."""
    first: dict[str, dict] = {}
    for question in questions:
        first.setdefault(question["turns"][0], question)
    return list(first.values())


def prompt_questions(path) -> list[dict]:
    """Single-turn questions from a prompts file: JSONL rows {"prompt", optional "category" and "question_id" (an
    integer: FastChat's answer files key on it)}, or a .txt file with one prompt a line. A row without a category
    counts under "prompts"; rows without a question_id are numbered 1, 2, ... Either file is UTF-8 text (a byte
    order mark is dropped); any other format is an error naming the two it takes."""
    from alignkit.core.data_files import decode_text

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts_file {path} not found; check the path")
    if path.suffix.lower() == ".txt":  # P.TXT was read as JSONL ("not valid JSON"), where .CSV was refused as a table
        rows = [(i, {"prompt": line.strip()}) for i, line in enumerate(decode_text(path.read_bytes(), path).split("\n"), 1)
                if line.strip()]
    else:
        _prompts_format(path, path.read_bytes())
        rows = read_jsonl(path, _PROMPTS_FORMATS)
    questions, seen = [], {}
    fix = _PROMPTS_FIXES
    for n, (line, row) in enumerate(rows, 1):
        prompt = field_value(path, line, row, "prompt", str, fix["prompt"])
        if not prompt.strip():
            raise ConfigError(f"{path}, line {line}: field 'prompt' is empty; {fix['prompt']}")
        qid = field_value(path, line, row, "question_id", int, fix["question_id"]) if "question_id" in row else n
        numbered = " (its row number: rows without one are numbered)"
        if qid in seen:
            then, then_numbered = seen[qid]
            raise ConfigError(f"{path}, line {line}: question_id {qid}{'' if 'question_id' in row else numbered} "
                              f"repeats line {then}{numbered if then_numbered else ''}; give every row its own "
                              "question_id, or none")
        seen[qid] = (line, "question_id" not in row)
        category = field_value(path, line, row, "category", str, fix["category"]) if "category" in row else "prompts"
        questions.append({"question_id": qid, "category": category, "turns": [prompt]})
    if not questions:
        raise ConfigError(f"{path} holds no prompts; {fix['prompt']}")
    return questions


def selected_prompts(path, question_ids: list[int] | None = None, max_questions: int | None = None) -> list[dict]:
    """evaluate.py pairwise's questions: each prompt of the prompts file once (distinct_questions), those of
    --question_ids, at most --max_questions (alignkit.evals.mtbench.select). A later row of a repeated prompt is that
    prompt: its id selects it, the first row's id standing for it, said in one line (it was "not in" the file)."""
    from alignkit import logger
    from alignkit.evals.mtbench import select

    questions = prompt_questions(path)
    if len(kept := distinct_questions(questions)) < len(questions):
        logger.info(f"{path}: {len(kept)} prompts ({len(questions) - len(kept)} repeated ones dropped: each is "
                    "judged once)")
    if question_ids:
        first = {q["turns"][0]: q["question_id"] for q in kept}
        stands_for = {q["question_id"]: first[q["turns"][0]] for q in questions}  # every row's id: its prompt's
        if repeats := [i for i in dict.fromkeys(question_ids) if stands_for.get(i, i) != i]:
            logger.info("--question_ids " + "; ".join(f"{i} repeats question {stands_for[i]}'s prompt, judged as "
                                                      f"{stands_for[i]}" for i in repeats))
        question_ids = [stands_for.get(i, i) for i in question_ids]
    return select(kept, question_ids, max_questions, path)
