"""MT-Bench and pairwise judgments in FastChat's model_judgment format: keyed, resumed, and one verdict per match.

`model_judgment/<judge>_pair.jsonl` holds one line per match (question, turn, pair) as each verdict arrives. A rerun
skips matches already judged by the same judge under the same settings (`judge_key`: endpoint, model, max_tokens,
temperature, judge prompt, the question's turns, reference answer) on the same answers. A match judged again (other
settings, other answers) leaves its earlier verdict behind: `retire_replaced` moves such verdicts to
`<judge>_pair.replaced.jsonl` once the run is judged, so the file FastChat's own show_result reads counts each match
once, as alignkit's results do; nothing paid for is lost, and a judge that comes back finds its verdicts there.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from alignkit.core.digests import digest
from alignkit.core.journal import append_jsonl, read_jsonl, threaded, write_atomic
from alignkit.core.progress import Progress


def judgment_path(output_dir, judge_model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", judge_model)  # "org/model" must not become a folder
    return Path(output_dir) / "model_judgment" / f"{slug}_pair.jsonl"


def judge_key(match, judge_identity: dict) -> str:
    """Everything that can change this match's verdicts, bar the answers (checked by their ids): the judge's
    identity (for an endpoint alignkit.feedback.judge.endpoint_identity: server, model, temperature, max_tokens; for a
    rule, its code), the judge prompt's text, the question's turns (an edited prompt is judged again, even on
    answers made elsewhere) and the reference answer. Written into each judgment record."""
    what = {"judge": judge_identity, "prompt": match.judge.prompt_template, "question": match.question["turns"],
            "reference": match.ref_answer}
    return digest(what, 16)


def judge_identity(client=None, rule=None) -> dict:
    """Who judges: an endpoint (an alignkit.core.llm.ChatClient) with the settings it sends, or a rule function,
    by its code (alignkit.core.code_digest: edit the rule, or a constant or helper it uses, and its
    old verdicts no longer apply)."""
    from alignkit.core.code_digest import code_fingerprint
    from alignkit.feedback.judge import endpoint_identity

    if client is not None:
        return endpoint_identity(client)
    name = getattr(rule, "__qualname__", type(rule).__qualname__)  # a partial or a callable object has none
    return {"rule": f"{getattr(rule, '__module__', '')}.{name}", "code": code_fingerprint(rule)}


def match_key(match, judge_identity: dict) -> tuple:
    return (match.judge.model_name, match.judge.prompt_template["name"], match.question["question_id"],
            match.model_1, match.model_2, 2 if match.multi_turn else 1, judge_key(match, judge_identity))


def record_key(record: dict) -> tuple:
    judge = list(record.get("judge") or ["?", "?"])
    # A record without a judge_key was written before judgments were keyed on the judge's settings: which server
    # and max_tokens made it is unknown, so it matches no match and the match is judged again.
    return (judge[0], judge[1], record.get("question_id"), record.get("model_1"), record.get("model_2"),
            record.get("turn", 1), record.get("judge_key"))


def read_judgments(path) -> dict[tuple, dict]:
    """{match key: the last judgment record of that match} of a FastChat pairwise judgment file, and of the
    verdicts it replaced before (`archive_path`: the file wins)."""
    found = {}
    for file in (archive_path(path), Path(path)):
        found.update({record_key(row): row for _, row in read_jsonl(file, "delete the line to judge the match again",
                                                                    repair_tail=True)})
    return found


def _answer_ids(match) -> list:
    """Each answer's answer_id (alignkit's and FastChat's answers have one, new for every answer), else its turns by
    content: a file made elsewhere without ids, edited in place, kept its old verdicts."""
    return [answer.get("answer_id") or f"turns:{digest(answer.get('choices'), 16)}"
            for answer in (match.answer_1, match.answer_2)]


def settled(match, judgments: dict, error_output: str, judge_identity: dict,
            retry_parse_failures: bool = False) -> dict | None:
    """The match's judgment when it needs no new request: judged by this judge under these settings, no failed
    request, same answers. A verdict that could not be parsed was paid for and stays, unless
    `retry_parse_failures`."""
    record = judgments.get(match_key(match, judge_identity))
    if record is None or error_output in (record.get("g1_judgment"), record.get("g2_judgment")):
        return None
    if record.get("answer_ids", _answer_ids(match)) != _answer_ids(match):
        return None
    if retry_parse_failures and "error" in (record.get("g1_winner"), record.get("g2_winner")):
        return None
    return record


def judge_matches(matches, play, path, judge_identity: dict, parallel: int = 1) -> list[dict]:
    """play(match) -> FastChat judgment record, for every match, `parallel` at a time.

    Each record is appended to `path` as soon as it arrives, so an interrupted run keeps every verdict so far.
    judge_identity: who judges under which settings (see judge_key), stamped on each record.
    """
    def run(match):
        record = play(match)
        record["answer_ids"] = _answer_ids(match)  # a later rerun re-judges the match if its answers change
        record["judge_key"] = judge_key(match, judge_identity)  # ... and if the judge or its settings change
        append_jsonl(path, [record])
        return record

    records = []
    with Progress("judging", len(matches), unit="match", errors=False) as progress:
        # Through threaded at --parallel 1 too: a Ctrl-C keeps the answer of the request under way (the default
        # sent it to the judge and dropped it).
        for _, result in threaded(run, matches, parallel, stop_on_error=True):  # no match starts after a failure
            if isinstance(result, BaseException):
                raise result
            records.append(result)
            progress.update()
    return records


def rule_player(rule, judge_name: str = "rule"):
    """play(match) for a rule judge rule(prompt, answer_a, answer_b) -> "A" | "B" | "tie", in FastChat's record
    format: asked in both orders like an LLM judge, so the same results code reads it."""
    names = {"A": "model_1", "B": "model_2"}
    verdicts = {"A": "[[A]]", "B": "[[B]]", "tie": "[[C]]"}  # FastChat's verdict tokens

    def play(match) -> dict:
        prompt = match.question["turns"][-1]
        a1, a2 = (a["choices"][0]["turns"][-1] for a in (match.answer_1, match.answer_2))
        g1, g2 = rule(prompt, a1, a2), rule(prompt, a2, a1)
        return {
            "question_id": match.question["question_id"], "model_1": match.model_1, "model_2": match.model_2,
            "g1_winner": names.get(g1, g1), "g2_winner": {"A": "model_2", "B": "model_1"}.get(g2, g2),
            "judge": [judge_name, match.judge.prompt_template["name"]],
            "g1_user_prompt": prompt, "g1_judgment": verdicts.get(g1, g1), "g2_user_prompt": prompt,
            "g2_judgment": verdicts.get(g2, g2),
            "turn": 2 if match.multi_turn else 1, "tstamp": time.time(),
        }

    return play


def read_verdicts(rule):
    """A rule's returns as rule_player reads them ("A", "B", "tie"): label.py's python: judge forms too (any case,
    "c" for a tie, or text ending in FastChat's [[A]]/[[B]]/[[C]]); anything else stays as it is (a judge error)."""
    from alignkit.feedback.judge import parse_verdict

    def read(prompt, answer_a, answer_b):
        said = rule(prompt, answer_a, answer_b)
        text = said.strip() if isinstance(said, str) else ""
        return {"a": "A", "b": "B", "tie": "tie", "c": "tie"}.get(text.lower()) or parse_verdict(text) or said

    return read


def archive_path(path) -> Path:
    """Where verdicts a later one replaced are kept (`<judge>_pair.replaced.jsonl`): FastChat never reads it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.replaced.jsonl")


def answers_path(path) -> Path:
    """Where each judge answer is kept as it arrives (`<judge>_pair.answers.jsonl`, fastchat_compat.judging_with),
    before its match has both and its verdict goes to `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.answers.jsonl")


def retire_replaced(path, current: list[dict]) -> tuple[int, int]:
    """Leave in `path` exactly one verdict per match of `current` (the records this run's results read), and every
    verdict of other matches; move the others of those matches (other settings, other answers, a failed attempt)
    to `archive_path`, where `read_judgments` still finds them: a judge that comes back reuses its verdicts. Returns
    (how many moved, how many of `current` came back from the archive: a rerun under earlier settings judges
    nothing again). Run under the output folder's hold (evaluate.py holds it), so nothing appends meanwhile."""
    path = Path(path)
    rows = [row for _, row in read_jsonl(path, "delete the line to judge the match again", repair_tail=True)]
    slot = lambda record: record_key(record)[:6]  # noqa: E731 - the match: question, turn, pair, judge, prompt
    chosen = {slot(r): r for r in current}
    moved = [row for row in rows if slot(row) in chosen and row != chosen[slot(row)]]
    present = [row for row in rows if slot(row) in chosen and row == chosen[slot(row)]]
    restored = len(chosen) - len(present)
    if not moved and not restored:
        return 0, 0
    archived = {json.dumps(row, sort_keys=True)
                for _, row in read_jsonl(archive_path(path), "delete the line", repair_tail=True)}
    append_jsonl(archive_path(path), [row for row in moved if json.dumps(row, sort_keys=True) not in archived])
    kept = [row for row in rows if slot(row) not in chosen] + list(chosen.values())
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))  # after the archive: nothing is lost
    return len(moved), restored
