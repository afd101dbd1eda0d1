"""MT-Bench pairwise evaluation: FastChat's data, answers in FastChat's format, judgments that resume.

Layout of `--output_dir` (FastChat's, so its own tools read it too):
    model_answer/<name>.jsonl              one line per question, both turns: appended as each batch finishes
    model_judgment/<judge>_pair.jsonl      one line per match (question, turn, pair): alignkit.evals.judgments
    results.json, results.png              per model pair: overall, per category, per turn

A rerun skips questions already answered as they now read (question_key: turns, category, its temperature) and
matches already judged by the same judge under the same settings (alignkit.evals.judgments); a match whose judge
request failed is sent again, and so is a match whose answers changed since it was judged. A verdict that could not
be parsed stays, unless --retry_parse_failures.

The data is FastChat's `fastchat/llm_judge/data` folder; without `--mt_bench_data`, its three files are
downloaded once into the alignkit cache and checked against the checksums pinned below (never when
ALIGNKIT_OFFLINE or HF_HUB_OFFLINE is set: then a clear error says to pass --mt_bench_data).
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
import uuid
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.digests import changed_settings, decisive_sampling, digest, sample_seed
from alignkit.core.journal import append_jsonl, read_jsonl, write_atomic
from alignkit.core.progress import Progress
from alignkit.evals.named_models import copied_from, same_source

QUESTIONS = "mt_bench/question.jsonl"
JUDGE_PROMPTS = "judge_prompts.jsonl"
REFERENCES = "mt_bench/reference_answer/gpt-4.jsonl"
# sha256 of FastChat's files (lm-sys/FastChat, fastchat/llm_judge/data), as published: a download must match.
CHECKSUMS = {
    JUDGE_PROMPTS: "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6",
    QUESTIONS: "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
    REFERENCES: "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f",
}
BASE_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/"
DOWNLOAD_TIMEOUT = 30.0  # seconds per connection attempt: a closed network fails fast instead of hanging
PAIR_PROMPTS = ["pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn"]
# The placeholders FastChat's run_judge_pair fills in each pairwise prompt's template (str.format): the question
# and both answers (each turn, in the multi-turn prompts), and the reference answer's turns in the math prompts.
_ONE_TURN, _TWO_TURNS = {"question", "answer_a", "answer_b"}, {"question_1", "question_2", "answer_a_1", "answer_b_1",
                                                               "answer_a_2", "answer_b_2"}
PLACEHOLDERS = {"pair-v2": _ONE_TURN, "pair-v2-multi-turn": _TWO_TURNS,
                "pair-math-v1": _ONE_TURN | {"ref_answer_1"},
                "pair-math-v1-multi-turn": _TWO_TURNS | {"ref_answer_1", "ref_answer_2"}}
VERDICT_FORMATS = ("[[A]]", "[[rating_a,rating_b]]")  # the output formats FastChat parses a pairwise verdict from
_FIX_DATA = "point --mt_bench_data at FastChat's fastchat/llm_judge/data folder, or fix the file"


# ---------------------------------------------------------------------------------------------------------
# Data: FastChat's folder, given or downloaded


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_mismatches(folder) -> list[str]:
    """The pinned files of `folder` that are missing or differ from FastChat's published ones."""
    folder = Path(folder)
    return [name for name, digest in CHECKSUMS.items()
            if not (folder / name).is_file() or sha256(folder / name) != digest]


def _offline() -> str | None:
    for var in ("ALIGNKIT_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def download(target) -> Path:
    """Download FastChat's three files into `target` once; each must match its pinned checksum."""
    target = Path(target)
    if not checksum_mismatches(target):
        return target
    how = ("get FastChat's fastchat/llm_judge/data folder (e.g. from a FastChat checkout) and pass "
           "--mt_bench_data DIR")
    if var := _offline():
        raise ConfigError(f"MT-Bench data is not in the cache ({target}) and {var} is set, so nothing is downloaded: "
                          f"{how}")
    for name, expected in CHECKSUMS.items():
        file = target / name
        if file.is_file() and sha256(file) == expected:
            continue
        url = BASE_URL + name
        logger.info(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                data = response.read()
        except OSError as e:  # URLError, timeouts, refused connections
            raise ConfigError(f"could not download {url} ({getattr(e, 'reason', e)}). Without network, {how}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != expected:
            raise ConfigError(f"{url} does not match its pinned checksum (sha256 {got}, expected {expected}): FastChat "
                              f"changed the file or the download is corrupt. Nothing was saved; {how}")
        write_atomic(file, data)  # never a half-written file under the real name
    return target


def check_data_dir(mt_bench_data: str) -> Path:
    """--mt_bench_data's folder, which must hold FastChat's three files (checked before the judge's key is asked for,
    so a wrong path is one line whether or not the key is set)."""
    folder = Path(mt_bench_data)
    missing = [name for name in CHECKSUMS if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"--mt_bench_data {folder} lacks {', '.join(missing)}: it must be FastChat's data folder "
                          "(judge_prompts.jsonl, mt_bench/question.jsonl, mt_bench/reference_answer/gpt-4.jsonl)")
    return folder


def data_dir(mt_bench_data: str | None) -> Path:
    """The FastChat data folder to use: the one given (checked for its files) or the checked download."""
    if mt_bench_data is None:
        from alignkit.core.paths import cache_dir

        return download(cache_dir() / "fastchat-llm-judge")
    folder = check_data_dir(mt_bench_data)
    if changed := checksum_mismatches(folder):
        logger.info(f"{folder}: {', '.join(changed)} differ from FastChat's published files; results will not be "
                    "comparable with published MT-Bench numbers")
    return folder


def field_value(path, line, row, name, kind, fix):
    if name not in row:  # a misspelt key said "must be a string, got None"
        from alignkit.core.row_checks import no_field

        raise ConfigError(f"{path}, line {line}: {no_field(row, name)}; {fix}")
    value = row.get(name)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is list:
        ok = ok and len(value) > 0 and all(isinstance(v, str) for v in value)
    if not ok:
        want = {int: "an integer", str: "a string", list: "a non-empty list of strings"}[kind]
        raise ConfigError(f"{path}, line {line}: field {name!r} must be {want}, got {value!r:.80}; {fix}")
    return value


def load_questions(path, question_ids=None, max_questions=None) -> list[dict]:
    """FastChat's question rows ({question_id, category, turns}), validated, optionally filtered."""
    questions, seen = [], {}  # question_id: its line
    for line, row in read_jsonl(path, _FIX_DATA):
        qid = field_value(path, line, row, "question_id", int, _FIX_DATA)
        field_value(path, line, row, "category", str, _FIX_DATA)
        field_value(path, line, row, "turns", list, _FIX_DATA)
        if qid in seen:  # both lines named, as a prompts file's repeated id: the user keeps one of them
            raise ConfigError(f"{path}, line {line}: question_id {qid} repeats line {seen[qid]}; {_FIX_DATA}")
        seen[qid] = line
        questions.append(row)
    if not questions:
        raise ConfigError(f"{path} holds no questions; {_FIX_DATA}")
    return select(questions, question_ids, max_questions, path)


def select(questions, question_ids=None, max_questions=None, source="the questions") -> list[dict]:
    if question_ids:
        known = {q["question_id"] for q in questions}
        unknown = [i for i in question_ids if i not in known]
        if unknown:
            ids = sorted(known)
            raise ConfigError(f"--question_ids {', '.join(map(str, unknown))} not in {source} "
                              f"(its ids run {ids[0]}..{ids[-1]})")
        wanted = set(question_ids)
        questions = [q for q in questions if q["question_id"] in wanted]
    return questions[:max_questions] if max_questions else questions


def load_judge_prompts(path) -> dict:
    """FastChat's judge prompts by name; the four pairwise ones must be there, each template filling only the
    placeholders FastChat gives it and asking for a verdict format FastChat parses. Checked before any model
    answers: FastChat would otherwise fail on the first match, after every answer was generated."""
    prompts, lines = {}, {}
    for line, row in read_jsonl(path, _FIX_DATA):
        for name in ("name", "type", "system_prompt", "prompt_template", "output_format"):
            field_value(path, line, row, name, str, _FIX_DATA)
        prompts[row["name"]], lines[row["name"]] = row, line
    missing = [p for p in PAIR_PROMPTS if p not in prompts]
    if missing:
        raise ConfigError(f"{path} lacks the judge prompt(s) {', '.join(missing)}; {_FIX_DATA}")
    for name in PAIR_PROMPTS:
        _check_template(path, lines[name], prompts[name], PLACEHOLDERS[name])
    return prompts


def _check_template(path, line, row, allowed: set) -> None:
    import string

    where = f"{path}, line {line} ({row['name']})"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(row["prompt_template"]) if f is not None]
    except ValueError as e:  # a single { or }: FastChat's str.format fails on it
        raise ConfigError(f"{where}: field 'prompt_template' is not a format string FastChat can fill ({e}); write "
                          "a literal brace as {{ or }}") from None
    unknown = sorted({f.split(".")[0].split("[")[0] for f in fields} - allowed)
    if unknown:
        raise ConfigError(f"{where}: field 'prompt_template' has the placeholder(s) {', '.join(unknown)}, which "
                          f"FastChat does not fill; it fills {', '.join(sorted(allowed))} (a literal brace is "
                          "written {{ or }})")
    if row["output_format"] not in VERDICT_FORMATS:
        raise ConfigError(f"{where}: field 'output_format' is {row['output_format']!r}; FastChat parses a pairwise "
                          f"verdict only as {' or '.join(VERDICT_FORMATS)}")


def load_reference_answers(path) -> dict[int, dict]:
    """FastChat's reference answers by question id (FastChat's answer format)."""
    return read_answers(path, fix=_FIX_DATA, repair_tail=False)  # data is never rewritten


def check_references(questions, references, need_ref_cats, path) -> None:
    """Every question of a reference-based category needs a reference answer for each of its turns."""
    for q in questions:
        if q["category"] in need_ref_cats:
            ref = references.get(q["question_id"])
            if ref is None or len(ref["choices"][0]["turns"]) < len(q["turns"]):
                raise ConfigError(
                    f"question {q['question_id']} ({q['category']}) is judged against a reference answer, but {path} "
                    f"has {'none' if ref is None else 'too few turns'} for it; add it, or leave the question out "
                    "with --question_ids"
                )


# ---------------------------------------------------------------------------------------------------------
# Answers, in FastChat's model_answer format


def answer_path(output_dir, name: str) -> Path:
    return Path(output_dir) / "model_answer" / f"{name}.jsonl"


def answers_key(loader, s, backend: str) -> str:
    """What a model's answers depend on besides the questions: the model as loaded
    (alignkit.modeling.identity.model_identity of the loader settings, with the engine), and the sampling settings.
    Recorded with every answer as `settings_key`, so a rerun under other settings never takes old answers for
    new ones."""
    return answers_key_and_settings(loader, s, backend)[0]


def answers_key_and_settings(loader, s, backend: str) -> tuple[str, dict]:
    """(answers_key, its parts each readable: the model as loaded by its digest), the model's identity computed
    once. The parts are recorded beside the key, so that answers made under other settings are refused naming the
    ones that changed."""
    from alignkit.modeling.chain import resolve
    from alignkit.modeling.identity import identity_parts, model_identity

    resolved = resolve(loader.model_id, loader.revision)  # once, for both (a Hub adapter's is a request)
    loaded = model_identity(loader, backend, resolved)
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "num_beams": s.num_beams,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed}  # recorded as given, keyed as decoding reads it
    key = digest({"loaded": loaded, **decisive_sampling(sampling)}, 16, ensure_ascii=True)
    model = {k: v for k, v in loaded.items() if k != "libraries"}  # the versions named apart, readable
    return key, {"model as loaded": digest(model, 16, ensure_ascii=True),
                 "library versions": ", ".join(f"{k} {v}" for k, v in sorted(loaded["libraries"].items())),
                 **{f"--{k}": v for k, v in sampling.items()},
                 PARTS: identity_parts(loader, loaded, resolved)}  # its parts, named: what changed is said by name


PARTS = "model parts"  # beside "model as loaded": its parts (alignkit.modeling.identity.identity_parts), said apart


def _decisive(settings: dict) -> dict:
    """An answer's recorded settings (answers_key_and_settings) as decoding reads them (decisive_sampling); the
    model's parts count through its digest ("model as loaded"), and name what changed."""
    flags = decisive_sampling({k[2:]: v for k, v in settings.items() if k.startswith("--")})
    return {**{k: v for k, v in settings.items() if k != PARTS}, **{f"--{k}": v for k, v in flags.items()}}


def _change(key: str, then: dict, now: dict) -> str:
    """How one recorded setting changed, in words: the model as loaded by the parts that changed, where recorded."""
    from alignkit.modeling.identity import changed_parts

    if key == "model as loaded" and (why := changed_parts(then.get(PARTS), now.get(PARTS))):
        return why
    return f"{key} {_said(key, then.get(key, 'unrecorded'))} then, {_said(key, now.get(key))} now"


def _said(flag: str, value) -> str:
    """A recorded setting as the user would write it (None is Python's word)."""
    if value is None:
        return "none (FastChat's per-category temperatures)" if flag == "--temperature" else "none"
    return str(value)


def made_under(row: dict, key: str, settings: dict | None) -> bool:
    """Whether an answer was made under `key` (answers_key): its settings_key says so, or its recorded settings are
    `settings` as decoding reads them (a greedy answer made under another --seed, or recorded before keys dropped
    it)."""
    if row.get("settings_key") == key:
        return True
    then = row.get("settings")
    return bool(settings) and isinstance(then, dict) and _decisive(then) == _decisive(settings)


def read_answers(path, source: str | None = None, fix: str | None = None, repair_tail: bool = True,
                 key: str | None = None, settings: dict | None = None) -> dict[int, dict]:
    """{question_id: answer record} of a FastChat answer file (the last record of a question wins).

    source: the model these answers must come from; answers recorded from another one are an error.
    key: the `answers_key` they must have been made under; answers recorded under other settings are an error
        (answer files made elsewhere, without a key, are taken as they are); `settings` (answers_key_and_settings) names
        which changed, where the answer recorded its own.
    """
    fix = fix or "delete the file (or the line) to answer again"
    answers = {}
    for line, row in read_jsonl(path, fix, repair_tail=repair_tail):
        qid = field_value(path, line, row, "question_id", int, fix)
        choices = row.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            raise ConfigError(f"{path}, line {line}: field 'choices' must be a list of {{index, turns}}; {fix}")
        field_value(path, line, choices[0], "turns", list, fix)
        recorded = row.get("source")
        # By the model as loaded where the answer has its key (a path as typed, read from another folder, is another
        # path: the same model, refused), by its path where not.
        same_model = key is not None and made_under(row, key, settings)
        # A keyed answer's model recorded at another path may be this folder moved or copied: its content then decides,
        # and a refusal says what changed in it (it said "holds answers by runs/tiny-dpo, not /other/tiny-dpo" of a
        # copy edited since).
        then = row.get("settings") if key is not None and "settings_key" in row else None
        if source is not None and recorded is not None and not same_model and \
                same_source(recorded) != same_source(source) and not (
                    isinstance(then, dict) and
                    copied_from(recorded, source, then.get(PARTS), (settings or {}).get(PARTS))):
            raise ConfigError(
                f"{path} holds answers by {recorded}, not {source}: give this model another NAME in --models, use "
                "another --output_dir, or delete the file to answer again"
            )
        if key is not None and "settings_key" in row and not same_model:
            then, now = row.get("settings"), settings or {}
            if isinstance(then, dict) and (changed := [k for k in changed_settings(then, now, _decisive)
                                                        if k != PARTS]):
                # a part recorded since (library versions) reads "unrecorded" then
                raise ConfigError(
                    f"{path}, line {line}: this answer was made under another {', '.join(changed)} "
                    f"({'; '.join(_change(k, then, now) for k in changed)}); give this model another NAME in "
                    "--models, use another --output_dir, or delete the file to answer again")
            raise ConfigError(
                f"{path}, line {line}: this answer was generated by another model as loaded (its files, down its "
                "adapter chain, or its loading: dtype, quantization, GGUF file, backend, hardware, library versions) "
                "or under other "
                "sampling (--max_new_tokens, --temperature, --top_p, --num_beams, --seed); give this model another "
                "NAME in --models, use another --output_dir, or delete the file to answer again"
            )
        answers[qid] = row
    return answers


def question_key(question: dict) -> str:
    """What an answer depends on besides the model and its sampling (settings_key): the question's turns, its
    category, and the temperature FastChat gives that category (used unless --temperature, which settings_key
    holds). Recorded with every answer as `question_key`: an edited question, or a prompts file whose rows
    moved (their ids are line numbers), is answered again."""
    what = {"turns": question["turns"], "category": question["category"],
            "temperature": temperature_for(question, None)}
    return digest(what, 16)


def unanswered(questions, answers: dict) -> list[dict]:
    """The questions without an answer to every turn of the question as it now reads. An answer for another
    text is answered again (a new record, which supersedes it), not an error: the rest of the file still holds.
    An answer without a question_key is taken as it is when made elsewhere (no `source`), answered again when
    alignkit made it before answers recorded their question."""
    def current(answer, q) -> bool:
        if "question_key" in answer:
            return answer["question_key"] == question_key(q)
        return "source" not in answer

    return [q for q in questions if (a := answers.get(q["question_id"])) is None
            or len(a["choices"][0]["turns"]) < len(q["turns"]) or not current(a, q)]


def reuse_answers(path, folders, questions, name: str, source: str, key: str, settings: dict | None = None) -> int:
    """Append to `path` the answers that other evaluation folders (`folders`, their model_answer/*.jsonl) hold for
    questions `path` has not answered: those of the same model as loaded under the same sampling (`settings_key`
    equal to `key`: model_identity, by content down the adapter chain, and the sampling settings with the seed where decoding reads it: made_under) to
    the same question as it now reads (`question_key`), under any NAME. Each question and turn is sampled from its
    own seed, so such an answer is the one generating it here would give. Returns how many were reused.
    rlaif.py's rounds pass the round before: its new policy is this round's previous one."""
    wanted = {q["question_id"]: question_key(q) for q in unanswered(questions, read_answers(path))}
    found, supplied = {}, []
    for folder in folders:
        for other in sorted((Path(folder) / "model_answer").glob("*.jsonl")):
            if other.resolve() == Path(path).resolve():
                continue
            for row in _rows_or_none(other):
                qid = row.get("question_id")
                if qid in wanted and made_under(row, key, settings) and row.get("question_key") == wanted[qid] \
                        and _whole_answer(row):  # the last one of a question wins, as read_answers reads a file
                    found[qid] = {**row, "model_id": name, "source": source, "reused_from": str(other)}
    for row in found.values():
        supplied += [] if row["reused_from"] in supplied else [row["reused_from"]]
    if found:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, list(found.values()))
        logger.info(f"{name}: {len(found)} answers reused from {', '.join(supplied)} (the same model as loaded, "
                    "sampled alike)")
    return len(found)


def _whole_answer(row: dict) -> bool:
    """An answer record read_answers takes: its turns a list of texts (another folder's rows are not this run's to
    refuse, nor to copy in and have refused)."""
    choices = row.get("choices")
    turns = choices[0].get("turns") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    return isinstance(turns, list) and bool(turns) and all(isinstance(t, str) for t in turns)


def _rows_or_none(path) -> list[dict]:
    """A file's JSON rows, a line that does not read skipped (another folder's: not this run's to refuse)."""
    import json

    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def temperature_for(question: dict, temperature: float | None) -> float:
    """The given temperature, or FastChat's MT-Bench temperature for the question's category."""
    if temperature is not None:
        return temperature
    from alignkit.evals.fastchat_compat import load

    common, _ = load()
    return common.temperature_config.get(question["category"], 0.7)


def generate_answers(generator, questions, name: str, source: str, path, s, key: str | None = None,
                     settings: dict | None = None) -> int:
    """Answer every question not yet answered in `path` as it now reads (unanswered), all turns, and append
    FastChat answer records.

    generator: a model from alignkit.modeling.generation.load_generator, on either backend. Each turn is asked with the
    conversation so far (earlier questions and the model's own answers) through the model's chat template.
    Questions are batched by temperature; each batch's records are appended as soon as the batch is done, so
    an interrupted run keeps them. s: max_new_tokens, temperature, top_p, num_beams, batch_size, seed.
    Returns the number of questions answered now.
    """
    path = Path(path)
    done = read_answers(path, source, key=key, settings=settings)
    todo = unanswered(questions, done)
    if not todo:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    by_temperature: dict[float, list[dict]] = {}
    for q in todo:
        by_temperature.setdefault(temperature_for(q, s.temperature), []).append(q)
    answered = 0
    # A bar left open by an interrupt broke every later bar in a notebook's kernel: closed however this ends.
    with Progress(f"{name}: answering", len(todo), unit="question", errors=False) as progress:
        for temperature, group in by_temperature.items():
            for start in range(0, len(group), s.batch_size):
                batch = group[start : start + s.batch_size]
                histories: list[list[dict]] = [[] for _ in batch]
                for turn in range(max(len(q["turns"]) for q in batch)):
                    active = [i for i, q in enumerate(batch) if turn < len(q["turns"])]
                    for i in active:
                        histories[i].append({"role": "user", "content": batch[i]["turns"][turn]})
                    outs = generator(  # each question and turn its own seed: its answer is the same in any batch
                        [histories[i] for i in active], max_new_tokens=s.max_new_tokens,
                        temperature=temperature, top_p=s.top_p, num_beams=s.num_beams, batch_size=len(active),
                        seeds=[sample_seed(s.seed, question_key(batch[i]), turn) for i in active],
                    )
                    for i, out in zip(active, outs):
                        histories[i].append({"role": "assistant", "content": out})
                append_jsonl(path, [{  # each batch journaled as it finishes: a crash keeps every batch before it
                    "question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": name,
                    "choices": [{"index": 0, "turns": [m["content"] for m in history if m["role"] == "assistant"]}],
                    "tstamp": time.time(), "source": source, "question_key": question_key(q),
                    "generation": {"temperature": temperature, "top_p": s.top_p, "num_beams": s.num_beams,
                                   "max_new_tokens": s.max_new_tokens},
                    **({"settings_key": key} if key else {}), **({"settings": settings} if settings else {}),
                } for q, history in zip(batch, histories)])
                answered += len(batch)
                progress.update(len(batch))
    return answered
