"""label.py, alignkit.feedback.judge and alignkit.feedback.labeling (with label_pairs, label_records): judges, both
orders, the cache, faults, crash and resume, tiny e2e.

The judge is a real HTTP server on 127.0.0.1 (tests/openai_server.py) reached through the real `openai`
client; it answers from the judge prompt it receives, so the tests can tell which slot held which response.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, run_script
from openai_server import FakeOpenAI, Fault, SilentServer

from alignkit.core.args import ConfigError
from alignkit.core.data import DataError, load_preferences, load_sft
from alignkit.core.errors import EndpointRefused, UserError
from alignkit.feedback.judge import combine, parse_verdict, winner
from alignkit.feedback.judge_templates import load_template
from alignkit.feedback.label_records import AppendLog

DATA = Path(__file__).parent / "data" / "label"
SLOT = re.compile(r"\[Response (A|B)\]\n(.*?)\n\[End of Response \1\]", re.S)


# ------------------------------------------------------------------------------------------- helpers
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def marker_pairs(tmp_path: Path, n: int = 6, identical: bool = True) -> list[str]:
    """Responses files a.jsonl and b.jsonl: in row i, A has the MARKER word when i is even, B when odd;
    the last row (when `identical`) has the same answer on both sides. Returns the prompts in order."""
    prompts = [f"question {i}: say something useful." for i in range(n)]
    a, b = [], []
    for i, p in enumerate(prompts):
        if identical and i == n - 1:
            a.append({"prompt": p, "response": f"the same answer {i}"})
            b.append({"prompt": p, "response": f"the same answer {i}"})
        else:
            a.append({"prompt": p, "response": f"answer {i} from A" + (" MARKER" if i % 2 == 0 else "")})
            b.append({"prompt": p, "response": f"answer {i} from B" + (" MARKER" if i % 2 else "")})
    write_jsonl(tmp_path / "a.jsonl", a)
    write_jsonl(tmp_path / "b.jsonl", list(reversed(b)))  # matched by prompt, not by row
    return prompts


def slots(body: dict) -> dict:
    return dict(SLOT.findall(body["messages"][-1]["content"]))


def marker_judge(body: dict) -> str:
    """Prefers the response that contains MARKER, wherever it sits."""
    found = slots(body)
    if "MARKER" in found["A"]:
        return "Response A mentions the marker.\n[[A]]"
    if "MARKER" in found["B"]:
        return "Response B mentions the marker; format reminder: [[A]], [[B]] or [[C]].\n[[B]]"
    return "Neither stands out.\n[[C]]"


def request_id(body: dict) -> str:
    return hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()


def label(tmp_path: Path, server, *extra: str, out: str = "prefs.jsonl") -> dict:
    """label.py in this process on a.jsonl/b.jsonl, judged by `server`; returns the summary."""
    run_script(
        "label.py", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge_base_url", server.base_url,
        "--judge_model", "fake-judge", "--output", out, *extra, cwd=tmp_path,
    )
    return json.loads((tmp_path / out).with_suffix(".summary.json").read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- judge.py
def test_verdicts_are_fastchat_tokens_and_the_last_one_counts():
    assert parse_verdict("A is clearer.\n[[A]]") == "A"
    assert parse_verdict("[[B]]") == "B" and parse_verdict("equally good [[C]]") == "tie"
    assert parse_verdict('Answer "[[A]]" if A is better, "[[B]]" if B is. Verdict: [[B]]') == "B"
    for garbage in ("A is better", "[A]", "[[D]]", "[[a]]", "", None):
        assert parse_verdict(garbage) is None


def test_both_orders_label_only_when_they_agree():
    assert winner("ab", "A") == "a" and winner("ba", "A") == "b" and winner("ba", "B") == "a"
    assert combine({"ab": "A", "ba": "B"}) == "a"  # response a won in both positions
    assert combine({"ab": "B", "ba": "A"}) == "b"
    assert combine({"ab": "A", "ba": "A"}) == "disagree"  # slot A always wins: position bias, no label
    assert combine({"ab": "tie", "ba": "tie"}) == "tie"
    assert combine({"ab": "A", "ba": "tie"}) == "disagree"  # a tie is never turned into a win
    assert combine({"ab": "A", "ba": None}) == "unparsed"
    assert combine({"ba": "B"}) == "a"  # one order only (--both_orders false)


def test_templates_default_self_reference_and_fastchat_files(tmp_path):
    default = load_template("default").messages("What is 2+2?", "4", "5")
    assert [m["role"] for m in default] == ["system", "user"]
    assert all(t in default[0]["content"] for t in ("[[A]]", "[[B]]", "[[C]]"))
    assert SLOT.findall(default[1]["content"]) == [("A", "4"), ("B", "5")]

    principle = "Which response is kinder to the user?"
    ref = load_template("self_reference", principle).messages("q", "x", "y")
    assert principle in ref[0]["content"] and "My answer" in ref[0]["content"]
    # the principle is part of the cache identity only where the template uses it
    assert load_template("default", "p1").fingerprint() == load_template("default", "p2").fingerprint()
    assert load_template("self_reference", "p1").fingerprint() != load_template("self_reference", "p2").fingerprint()

    # FastChat's format: the one usable pairwise entry is picked (multi-turn, reference and single ones are not)
    fastchat = load_template(str(DATA / "judge_prompts.jsonl"))
    assert fastchat.name == "judge_prompts.jsonl#pair-test"
    user = fastchat.messages("Q?", "first", "second")[1]["content"]
    assert "[Assistant A]\nfirst\n" in user and "[Assistant B]\nsecond\n" in user and "{this}" in user
    assert load_template(f"{DATA / 'judge_prompts.jsonl'}#pair-test") == fastchat

    with pytest.raises(ConfigError, match=r"line 3 \(pair-with-reference\).*\{ref_answer_1\} is not supported"):
        load_template(f"{DATA / 'judge_prompts.jsonl'}#pair-with-reference")
    with pytest.raises(ConfigError, match="'single' is not a pairwise prompt"):
        load_template(f"{DATA / 'judge_prompts.jsonl'}#single-test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x", "prompt_template": "{question} {answer_a}"}\n{"name": oops}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2: not valid JSON.*each line holds one judge prompt"):
        load_template(str(bad))
    bad.write_text('{"name": "x", "prompt_template": "{question} {answer_a}"}\n')
    with pytest.raises(ConfigError, match=r"line 1 \(x\).*must contain \{answer_a\} and \{answer_b\}"):
        load_template(str(bad))
    two = tmp_path / "two.jsonl"
    write_jsonl(two, [{"name": n, "prompt_template": "{answer_a} {answer_b}"} for n in ("p", "q")])
    with pytest.raises(ConfigError, match=r"several pairwise judge prompts \(p, q\).*#NAME"):
        load_template(str(two))
    with pytest.raises(ConfigError, match="no such file"):
        load_template("nope.jsonl")


# ------------------------------------------------------------------------------------------- the cache
def test_cache_drops_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "cache.jsonl"
    log = AppendLog(path)
    log.append({"key": "k1", "text": "[[A]]"})
    log.append({"key": "k2", "text": "[[B]]"})
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "k3", "text": "[[')  # what SIGKILL in the middle of a write leaves
    log = AppendLog(path)
    assert set(log.records) == {"k1", "k2"}
    log.append({"key": "k4", "text": "[[C]]"})
    log.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k1", "k2", "k4"]

    import fcntl

    with open(path, "a+b") as other:  # another process working on this cache holds its lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="in use by another label.py run"):
            AppendLog(path)


# ------------------------------------------------------------------------------------------- against the server
def test_labels_land_on_the_right_rows_and_secrets_stay_out(tmp_path, monkeypatch, capfd):
    secret = "sk-test-do-not-leak-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    prompts = marker_pairs(tmp_path)
    with FakeOpenAI(marker_judge) as server:
        summary = label(tmp_path, server)
        sent = [request_id(b) for b in server.requests]
        texts = [b["messages"][-1]["content"] for b in server.requests]

        out = rows(tmp_path / "prefs.jsonl")
        assert [r["prompt"] for r in out] == [[{"role": "user", "content": p}] for p in prompts[:-1]]
        for r in out:
            assert "MARKER" in r["chosen"][0]["content"] and "MARKER" not in r["rejected"][0]["content"]
            assert r["verdicts"] == {"chosen_in_A": "A", "chosen_in_B": "B"}
            assert r["judge"] == "openai:fake-judge" and r["judge_template"] == "default"
        assert [r["chosen_source"] for r in out] == ["a.jsonl", "b.jsonl", "a.jsonl", "b.jsonl", "a.jsonl"]
        assert len(load_preferences(str(tmp_path / "prefs.jsonl"))) == 5  # dpo.py's loader reads it as it is

        assert len(sent) == len(set(sent)) == 10  # 5 pairs x 2 orders, nothing twice
        assert not any("the same answer" in t for t in texts)  # identical responses never reach the judge
        assert summary["labeled"] == 5 and summary["skipped"]["identical"] == 1
        assert summary["agreement"] == 1.0 and summary["slot_a_wins"] == 0.5
        assert summary["tokens_this_run"]["judge"] == {"calls": 10, "prompt_tokens": 100, "completion_tokens": 50}

        # A rerun finds every judgment in the cache: no request, the same output, each pair once.
        again = label(tmp_path, server)
        assert server.count == 10 and again["judgments"]["from_cache"] == 10
        assert rows(tmp_path / "prefs.jsonl") == out

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"prefs.jsonl", "prefs.summary.json", "prefs.config.json", "judgments.jsonl"}
    captured = capfd.readouterr()
    for text in [p.read_text() for p in written] + [captured.out, captured.err]:
        assert secret not in text


def test_a_key_in_any_variable_and_a_password_in_the_judge_url_stay_out(tmp_path, monkeypatch, capfd):
    """Only *_API_KEY-style names were secrets: a key in the variable --judge_api_key_env names (the README's
    MY_KEY) was printed in the clear when the judge's 401 repeated it, as OpenAI's does; and user:password in a
    --judge_base_url went into prefs.config.json and the log."""
    key, password = "judgeKeyNotNamedAsSecret777", "SuperSecretPass123"
    monkeypatch.setenv("MYJUDGE", key)
    marker_pairs(tmp_path)
    refusal = Fault(status=401, body=json.dumps({"error": {"message": f"Incorrect API key provided: {key}.",
                                                          "type": "invalid_request_error"}}))
    with FakeOpenAI(lambda body: refusal) as server:
        url = server.base_url.replace("://", f"://alice:{password}@") + "?api_key=QueryKeyABCDEF999"
        with pytest.raises(EndpointRefused) as refused:
            run_script("label.py", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge_base_url", url,
                       "--judge_model", "fake-judge", "--judge_api_key_env", "MYJUDGE", "--output", "prefs.jsonl",
                       cwd=tmp_path)
    try:  # the line the script prints: the error hook's
        from alignkit.core.errors import _report

        _report(type(refused.value), refused.value, None)
    except SystemExit:
        pass
    captured = capfd.readouterr()
    assert "error: the judge refused the request" in captured.err
    written = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert any("alice:***@" in text for text in written)  # prefs.config.json keeps the URL, masked
    for text in written + [captured.out, captured.err]:
        assert key not in text and password not in text and "QueryKeyABCDEF999" not in text


def test_no_position_bias_is_slot_a_winning_as_often_as_slot_b_not_50_percent(tmp_path):
    """The label notebook said "how often slot A wins (position bias: 50% is none)": with tie verdicts counted, a
    judge without bias has slot A win as often as slot B, here 25% each (found by the notebook audit)."""
    prompts = marker_pairs(tmp_path, n=5, identical=False)
    (tmp_path / "judge.py").write_text(  # a fair judge: the marker wins wherever it sits; prompts 2 and 3 tie
        "def judge(prompt, a, b):\n    if '2:' in prompt or '3:' in prompt:\n        return 'tie'\n"
        "    return 'A' if 'MARKER' in a else 'B'\n")
    run_script("label.py", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge", "python:judge.py:judge",
               "--output", "p.jsonl", "--max_prompts", "4", cwd=tmp_path)
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["slot_a_wins"] == summary["slot_b_wins"] == 0.25 and summary["tie_verdicts"] == 0.5
    text = (ROOT / "label.py").read_text()
    assert "50% is none" not in text and "how often slot A wins and slot B wins (position bias: none when they are " \
        "equal" in text


def test_one_order_per_pair_when_asked(tmp_path):
    marker_pairs(tmp_path)
    with FakeOpenAI(marker_judge) as server:
        summary = label(tmp_path, server, "--both_orders", "false")
        assert server.count == 5 and summary["labeled"] == 5 and summary["agreement"] is None
        # the slot order is drawn per pair, so a single-order run does not always put model_a first
        assert {slots(b)["A"].split()[3] for b in server.requests} == {"A", "B"}
    assert all("MARKER" in r["chosen"][0]["content"] for r in rows(tmp_path / "prefs.jsonl"))


def test_a_judge_that_always_says_A_yields_no_labels(tmp_path, alignkit_log, capsys):
    """An empty output said "train on it: python dpo.py ..."; every pair identical was said nowhere (found by an
    audit). Each says why in one line, and that there is nothing to train on."""
    marker_pairs(tmp_path)
    with FakeOpenAI(lambda body: "Both are fine, but I pick [[A]]") as server:
        summary = label(tmp_path, server)
    assert rows(tmp_path / "prefs.jsonl") == []
    assert summary["labeled"] == 0 and summary["disagreements"] == 5
    assert summary["slot_a_wins"] == 1.0 and summary["agreement"] == 0.0
    assert "no pair was labeled: 5 disagreements between the two orders (see " in alignkit_log.text
    assert "let one order decide (--both_orders false)" in alignkit_log.text
    assert "nothing to train on: prefs.jsonl is empty" in capsys.readouterr().out
    # Every pair a tie: the hint said to let one order decide, which cannot help (a tie is one in either order).
    alignkit_log.clear()
    with FakeOpenAI(lambda body: "Equally good. [[C]]") as server:
        assert label(tmp_path, server, out="ties.jsonl")["ties"] == 5
    assert "no pair was labeled: 5 ties (see ties.summary.json); where the judge calls the answers equal, sample " \
           "them further apart" in alignkit_log.text
    assert "--both_orders" not in alignkit_log.text and "nothing to train on: ties.jsonl is empty" in \
        capsys.readouterr().out
    (tmp_path / "b.jsonl").write_text((tmp_path / "a.jsonl").read_text())  # the two sides answered alike
    with FakeOpenAI(lambda body: "[[A]]") as server:
        assert label(tmp_path, server, out="same.jsonl")["labeled"] == 0 and server.count == 0
    assert "no pair to label: every prompt's pair was skipped (6 identical; see " in alignkit_log.text
    assert "train on it" not in capsys.readouterr().out


def test_another_output_beside_reuses_the_judgments_paid_for(tmp_path):
    """Judgments keyed on the judge's whole identity and the pair were read from this output's own cache only: the
    same pairs labelled into another --output beside it were paid for again (an audit). Read, not written."""
    marker_pairs(tmp_path)
    with FakeOpenAI(marker_judge) as server:
        first = label(tmp_path, server, out="prefs.jsonl")
        sent = server.count
        assert sent == 10 and label(tmp_path, server, out="again.jsonl")["labeled"] == first["labeled"] == 5
        assert server.count == sent  # nothing asked again
        assert rows(tmp_path / "again.jsonl") == rows(tmp_path / "prefs.jsonl")
        assert not (tmp_path / "again.cache" / "judgments.jsonl").read_text()  # the first run's file holds them
        label(tmp_path, server, "--judge_max_tokens", "99", out="other.jsonl")  # another judge: asked
        assert server.count == 2 * sent


def test_a_judge_that_never_gives_a_verdict_is_a_failed_run_and_its_answers_are_kept(tmp_path, monkeypatch):
    """A judge that never ended with a verdict (another format, a model that does not follow the template): label.py
    wrote an empty file and ended with status 0, and `label.py && dpo.py` went on. It fails in one line naming
    where its answers are and the fix; they are kept (a rerun asks nothing), and --retry_parse_failures asks again."""
    marker_pairs(tmp_path)
    with FakeOpenAI(lambda body: "Both are fine, but I won't say.") as server:
        with pytest.raises(UserError, match=r"^no pair was labeled: the judge gave no verdict in any of its 10 "
                                            r"answers \(they are in prefs\.cache/judgments\.jsonl\): an LLM judge "
                                            r"ends with \[\[A\]\], \[\[B\]\] or \[\[C\]\], as its template asks "
                                            r"\(an answer cut short by --judge_max_tokens has none\); fix "
                                            r"--judge_model, --judge_template or --judge_max_tokens, then run again "
                                            r"with --retry_parse_failures true"):
            label(tmp_path, server)
        sent = server.count
        with pytest.raises(UserError, match="^no pair was labeled: the judge gave no verdict"):
            label(tmp_path, server)
        assert server.count == sent  # its answers were paid for and kept
        monkeypatch.setenv("ALIGNKIT_STEP", "command")  # a step of rlaif.py, which passes label.py's flags on
        with pytest.raises(UserError, match=r"fix --judge_model, or give label.py's --judge_template or "
                                            r"--judge_max_tokens with --retry_parse_failures true in one --label_args, "
                                            r"e\.g\. --label_args '--judge_max_tokens 4096 --retry_parse_failures true'"):
            label(tmp_path, server)
        monkeypatch.delenv("ALIGNKIT_STEP")
    with FakeOpenAI(marker_judge) as server:
        assert label(tmp_path, server, "--retry_parse_failures", "true")["labeled"] == 5 and server.count == sent


def test_a_stop_while_judging_counts_this_run_s_judgments_not_the_cache_s(tmp_path, monkeypatch, alignkit_log):
    """Ctrl-C while judging said "N judgments are safe" with N every record of the shared cache (earlier runs',
    another judge's): a stop after 4 of 10 said 14. It says this run's count of what its pairs need, and the rest."""
    from alignkit.feedback import label_pairs

    marker_pairs(tmp_path)
    with FakeOpenAI(marker_judge) as server:
        label(tmp_path, server, "--judge_model", "other-judge")  # 10 judgments of another judge in the same cache
        real = label_pairs.threaded

        def stopped_after_4(fn, items, parallel):
            for n, result in enumerate(real(fn, items, 1)):
                if n == 4:
                    raise KeyboardInterrupt
                yield result

        monkeypatch.setattr(label_pairs, "threaded", stopped_after_4)
        with pytest.raises(KeyboardInterrupt):
            label(tmp_path, server)
    assert "interrupted: 4 of the 10 judgments these pairs need are safe in prefs.cache/judgments.jsonl; run the " \
        "same command again to ask for the other 6" in alignkit_log.text
    # What is kept is the last line said, after the progress bar's own last line (the Ctrl-C audit of session 30)
    lines = [r.getMessage() for r in alignkit_log.records]
    said = next(i for i, line in enumerate(lines) if line.startswith("interrupted:"))
    bars = [i for i, line in enumerate(lines) if line.startswith("judging:")]
    assert bars and max(bars) < said


def test_a_cell_run_again_counts_one_run_not_both(tmp_path, monkeypatch, alignkit_log):
    """A notebook's Judge cell run twice added its counts to the first run's: "120 pairs to judge (120 skipped)"
    while the summary said none skipped, "pairs (before skipping) 240" beside 120 judged (the notebook audit). Each
    step counts afresh: the Prompts, Responses and Judge cells run again give the counts of one run."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings
    from alignkit.feedback.label_pairs import judge_pairs, make_pairs
    from alignkit.feedback.label_records import write_output
    from alignkit.feedback.labeling import collect_responses, load_prompts, prepare

    prompts = marker_pairs(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in [*prompts, prompts[0]]])  # one repeated
    (tmp_path / "judge.py").write_text("def judge(prompt, a, b):\n    return 'A' if 'MARKER' in a else 'B'\n")
    monkeypatch.chdir(tmp_path)
    run = prepare(parse_config(LabelSettings, args=[
        "--prompts", "prompts.jsonl", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl",
        "--judge", "python:judge.py:judge", "--output", "p.jsonl"]))
    for _ in range(2):  # each cell twice, then all of them again
        found = load_prompts(run)
        found = load_prompts(run)
        responses = collect_responses(run, found)
        responses = collect_responses(run, found)
        pairs = make_pairs(run, found, responses)
        pairs = make_pairs(run, found, responses)
        judge_pairs(run, pairs)
        judge_pairs(run, pairs)
        write_output(run, found, responses, pairs)
    summary = write_output(run, found, responses, pairs)
    said = [r.getMessage() for r in alignkit_log.records]
    assert said.count("6 prompts from prompts.jsonl (1 repeated ones dropped)") == 4
    assert said.count("5 pairs to judge (1 skipped: see the summary)") == 4
    assert summary["pairs"] == 6 and summary["pairs_judged"] == 5 and summary["skipped"]["identical"] == 1
    assert summary["judgments"] == {"needed": 10, "sent_this_run": 0, "from_cache": 10, "failed": 0}
    assert json.loads((tmp_path / "p.summary.json").read_text()) == summary
    run.close()


def test_skip_invalid_skips_a_bad_prompt_row_as_its_error_line_says(tmp_path, alignkit_log):
    """label.py had no --skip_invalid, so rlaif.py's (its --help: "skip rows that fail validation") reached only its
    dpo.py runs and a bad prompt row still stopped round 1's label.py: label.py skips the row and says how many, and
    rlaif.py passes its own on to each round's label.py."""
    from pathlib import Path

    from alignkit.core.args import parse_config
    from alignkit.core.config import RLAIFSettings
    from alignkit.core.data import DataError
    from alignkit.modeling import presets
    from alignkit.train.rlaif_inputs import label_command

    prompts = marker_pairs(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompts[0]}, {"prompt": ""}, *({"prompt": p} for p in prompts[1:])])
    flags = ["--prompts", "prompts.jsonl", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge",
             "python:alignkit.modeling.presets:rule_judge", "--output", "out/p.jsonl"]
    with pytest.raises(DataError, match=r"prompts.jsonl: row 2: field 'prompt'"):
        run_script("label.py", *flags, cwd=tmp_path)
    run_script("label.py", *flags, "--skip_invalid", "true", cwd=tmp_path)
    assert "skipped 1 of 7 rows as invalid (--skip_invalid)" in alignkit_log.text
    assert (tmp_path / "out" / "p.jsonl").is_file() and "6 prompts from" in alignkit_log.text  # the 6 good ones
    s = parse_config(RLAIFSettings, ["--preset", "tiny", "--skip_invalid", "true"],
                     presets={"tiny": presets.defaults("rlaif")}, env_file=None)
    assert "--skip_invalid" in label_command(s, 1, s.model_id, None, Path("preferences.jsonl"))


def test_skip_invalid_skips_a_bad_response_row_and_the_pair_of_its_prompt(tmp_path, alignkit_log):
    """--skip_invalid covered the prompts' rows, not a --responses_a/_b file's: a bad response row stopped the run all
    the same. It is skipped and said in one line (file, count, first problem, without its fix); its prompt has no
    answer from that side, so its pair is skipped as missing; all rows bad is the one "no usable rows" line."""
    prompts = marker_pairs(tmp_path, identical=False)
    b = [{"prompt": p, "response": f"answer {i} from B" + (" MARKER" if i % 2 else "")} for i, p in enumerate(prompts)]
    b[1]["response"] = [{"role": "user", "content": "not an answer"}]  # last message not the assistant's
    b[2] = {"prompt": prompts[2], "respones": "a misspelt key"}  # no response value
    b[4] = 7  # no object at all: it stopped the run under --skip_invalid (the session's review)
    write_jsonl(tmp_path / "b.jsonl", b)
    (tmp_path / "judge.py").write_text("def judge(prompt, a, b):\n    return 'A' if 'MARKER' in a else 'B'\n")
    flags = ["--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge", "python:judge.py:judge",
             "--output", "out/p.jsonl"]
    with pytest.raises(DataError, match=r"^b.jsonl: row 2: field 'response': expected the last message to be the "
                                        r"assistant's, got role 'user'. Fix the row.$"):
        run_script("label.py", *flags, cwd=tmp_path)
    assert not (tmp_path / "out").exists()
    run_script("label.py", *flags, "--skip_invalid", "true", cwd=tmp_path)
    said = [r.getMessage() for r in alignkit_log.records if "(--skip_invalid)" in r.getMessage()]
    assert said == ["b.jsonl: skipped 3 of 6 rows as invalid (--skip_invalid). First problem: b.jsonl: row 2: field "
                    "'response': expected the last message to be the assistant's, got role 'user'."]  # once
    summary = json.loads((tmp_path / "out" / "p.summary.json").read_text())
    assert summary["prompts"] == 6 and summary["skipped"]["missing"] == 3 and summary["labeled"] == 3
    assert [r["prompt"][0]["content"] for r in rows(tmp_path / "out" / "p.jsonl")] == [prompts[0], prompts[3],
                                                                                        prompts[5]]
    # The prompts from a responses file: its bad rows (a bad prompt, a bad response) are one line, not one a reader.
    a = [{"prompt": p, "response": "fine"} for p in prompts]
    a[0]["prompt"], a[3]["response"] = "", 7
    write_jsonl(tmp_path / "a.jsonl", a)
    alignkit_log.clear()
    run_script("label.py", *flags[:-1], "out/q.jsonl", "--skip_invalid", "true", cwd=tmp_path)
    said = [r.getMessage() for r in alignkit_log.records if "(--skip_invalid)" in r.getMessage()]
    assert [line.partition(". First")[0] for line in said] == ["a.jsonl: skipped 2 of 6 rows as invalid "
                                                                "(--skip_invalid)", "b.jsonl: skipped 3 of 6 rows as "
                                                                "invalid (--skip_invalid)"]
    # Every row bad: the one line; a file without a response column is still refused whole.
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": p, "response": 7} for p in prompts])
    with pytest.raises(DataError, match=r"^b.jsonl: no usable rows: all 6 rows are invalid. First problem: b.jsonl: "
                                        r"row 1: field 'response': expected the response as text or an assistant "
                                        r"message, got int 7.$"):
        run_script("label.py", *flags[:-1], "out/r.jsonl", "--skip_invalid", "true", cwd=tmp_path)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": p, "reply": "y"} for p in prompts])
    with pytest.raises(DataError, match=r"b.jsonl: no response column"):
        run_script("label.py", *flags[:-1], "out/r.jsonl", "--skip_invalid", "true", cwd=tmp_path)
    assert not (tmp_path / "out" / "r.config.json").exists()


def test_a_missing_prompts_file_leaves_nothing_behind(tmp_path):
    """A --prompts file that is not there was refused after the cache folder and the settings file were written
    beside the output (found by an audit)."""
    from alignkit.core.data import DataError

    marker_pairs(tmp_path)
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        run_script("label.py", "--prompts", "nope.jsonl", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl",
                   "--judge", "python:alignkit.modeling.presets:rule_judge", "--output", "out/p.jsonl", cwd=tmp_path)
    assert not (tmp_path / "out").exists()
    # A file that is there but cannot be read (invalid JSON, no rows, a bad row) left the settings file and an empty
    # cache folder beside the output (the label.py audit of session 68): nothing is written until the inputs pass.
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi"\n')
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "number.jsonl", [{"prompt": "hi", "response": "x"}, {"prompt": 7, "response": "y"}])
    for flags, message in ((["--prompts", "bad.jsonl"], r"bad\.jsonl"), (["--prompts", "empty.jsonl"], r"empty"),
                           (["--responses_b", "number.jsonl"], r"number\.jsonl: row 2: field 'prompt'")):
        args = {"--responses_a": "a.jsonl", "--responses_b": "b.jsonl", **dict(zip(flags[::2], flags[1::2]))}
        with pytest.raises(DataError, match=message):
            run_script("label.py", *[x for kv in args.items() for x in kv], "--judge",
                       "python:alignkit.modeling.presets:rule_judge", "--output", "out/p.jsonl", cwd=tmp_path)
        assert not (tmp_path / "out").exists(), flags
    # Before the judge's key is asked for: a bad file was reported only once the key was set.
    with pytest.raises(DataError, match=r"bad\.jsonl"):
        run_script("label.py", "--prompts", "bad.jsonl", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl",
                   "--judge", "openai", "--judge_model", "gpt-4o", "--judge_api_key_env", "ALIGNKIT_TEST_NO_KEY",
                   "--output", "out/p.jsonl", cwd=tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl"):  # --mode pointwise's grader too
        run_script("label.py", "--mode", "pointwise", "--prompts", "bad.jsonl", "--responses_a", "a.jsonl", "--judge",
                   "openai", "--judge_model", "gpt-4o", "--judge_api_key_env", "ALIGNKIT_TEST_NO_KEY", "--output",
                   "out/p.jsonl", cwd=tmp_path)
    assert not (tmp_path / "out").exists()


def test_as_a_step_of_rlaif_no_command_to_train_on_the_output_is_suggested(tmp_path, monkeypatch, capsys):
    """Inside rlaif.py, label.py closed with `train on it: python dpo.py --dataset_id runs/.../preferences.jsonl`,
    noise there: rlaif trains on it next (the rlaif notebook audit of session 58). Alone, it still says it."""
    from alignkit.core.errors import STEP_OF

    (tmp_path / "longer.py").write_text('def judge(prompt, a, b):\n    return "A" if len(a) >= len(b) else "B"\n')
    marker_pairs(tmp_path, identical=False)
    args = ("--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge", f"python:{tmp_path / 'longer.py'}:judge")
    monkeypatch.delenv(STEP_OF, raising=False)
    run_script("label.py", *args, "--output", "alone.jsonl", cwd=tmp_path)
    assert "train on it: python dpo.py --dataset_id alone.jsonl" in capsys.readouterr().out
    monkeypatch.setenv(STEP_OF, "command")  # what alignkit.train.step_process gives rlaif's steps
    run_script("label.py", *args, "--output", "step.jsonl", cwd=tmp_path)
    out = capsys.readouterr().out
    assert "wrote step.jsonl" in out and "train on it" not in out and "nothing to train on" not in out


def test_a_python_judge_or_grader_that_raises_is_said_as_calls_not_requests(tmp_path, caplog):
    """A `python:` judge that raised was "judge request failed" and "N requests failed", endpoint wording for a
    function called in-process (the label.py audit of session 36); each line now says "call", and the fix names the
    function's file."""
    (tmp_path / "j.py").write_text('def judge(prompt, a, b):\n    raise ValueError("boom")\n'
                                   'def score(prompt, answer):\n    raise ValueError("boom")\n')
    marker_pairs(tmp_path, n=1, identical=False)
    files = ("--responses_a", "a.jsonl", "--responses_b", "b.jsonl")
    with pytest.raises(UserError, match=r"^no row was labeled: 2 judge calls failed \(see above\), so the output is "
                                        r"empty\. Fix j\.py:judge, then"):
        run_script("label.py", *files, "--judge", "python:j.py:judge", "--output", "o.jsonl", cwd=tmp_path)
    assert "judge call failed: ValueError: boom" in caplog.text and "request" not in caplog.text.split("label:")[-1]
    with pytest.raises(UserError, match=r"^no row was labeled: 2 grading calls failed \(see above\)"):
        run_script("label.py", *files, "--mode", "pointwise", "--judge", "python:j.py:score", "--output", "p.jsonl",
                   cwd=tmp_path)
    marker_pairs(tmp_path, n=3, identical=False)
    with pytest.raises(UserError, match=r"^the first 5 judge calls all failed \(ValueError: boom\)"):
        run_script("label.py", *files, "--judge", "python:j.py:judge", "--output", "o3.jsonl", cwd=tmp_path)
    # Failed generations beside failed judge calls were all "judge calls" (the session's review): each kind counted.
    from alignkit.feedback.label_records import refuse_empty

    with pytest.raises(UserError, match=r"^no row was labeled: 2 generation requests and 1 judge call failed \(see "):
        refuse_empty(0, {"generation request": 2, "judge call": 1}, "Fix j.py:judge")


def test_a_principle_the_judge_template_does_not_read_is_refused(tmp_path):
    """--principle with the default template was ignored without a word (found by an audit): the README's example
    pairs it with self_reference, the one template that reads it."""
    from alignkit.core.config import LabelSettings
    from alignkit.feedback.judge import make_judge

    with pytest.raises(ConfigError, match=r"^--principle is read only by a judge template that names \{principle\} "
                                          r"\(--judge_template self_reference, or your own\); default does not"):
        make_judge(LabelSettings(principle="Be brief", judge_base_url="http://127.0.0.1:9/v1"))
    assert make_judge(LabelSettings(principle="Be brief", judge_template="self_reference",
                                    judge_base_url="http://127.0.0.1:9/v1")).template.principle == "Be brief"


@pytest.mark.parametrize("args, message", [
    (["--judge", "python:alignkit.modeling.presets:rule_judge", "--principle", "be short"],
     r"^--principle is read only by --judge openai or hf, not by --judge python:alignkit.modeling.presets:rule_judge, "
     r"a function of the prompt and the answers: drop it, or judge with an LLM \(--judge openai or hf\)$"),
    # One setting at a time, with its own readers: --judge_base_url is the endpoint's alone.
    (["--judge", "rm:runs/rm", "--judge_model", "gpt-4o", "--judge_template", "self_reference"],
     r"^--judge_model is read only by --judge openai or hf, not by --judge rm:runs/rm, a reward model that scores "
     r"each answer: drop it, or judge with an LLM \(--judge openai or hf\)$"),
    (["--judge", "rm:runs/rm", "--judge_base_url", "http://127.0.0.1:9/v1"],
     r"^--judge_base_url is read only by --judge openai, not by --judge rm:runs/rm, a reward model that scores "
     r"each answer: drop it, or judge with an LLM \(--judge openai\)$"),
    # Under --mode pointwise no LLM reads a principle either: no LLM is suggested.
    (["--mode", "pointwise", "--judge", "python:alignkit.modeling.presets:score", "--principle", "x"],
     r"^--principle is read only by an LLM judge \(--judge openai or hf\) in --mode pairs, not by --judge "
     r"python:alignkit.modeling.presets:score, a function of the prompt and the answers, in --mode pointwise: "
     r"drop it$"),
    (["--judge", "python:alignkit.modeling.presets:rule_judge", "--judge_temperature", "0.5"], r"^--judge_temperature "),
    (["--judge", "hf", "--judge_model", "./judge", "--judge_base_url", "http://127.0.0.1:9/v1"],
     r"^--judge_base_url is read only by --judge openai, not by --judge hf, a local model: drop it$"),
    (["--judge_revision", "v2"], r"^--judge_revision is read only by --judge hf, not by --judge openai"),
    (["--mode", "completions", "--model_a", "openai:m", "--judge_model", "gpt-4o"],
     r"^--judge_model is read only by --judge openai or hf, not by --mode completions, which asks no judge"),
])
def test_a_judge_setting_the_judge_never_reads_is_refused(tmp_path, args, message):
    """--principle, --judge_template, --judge_model, --judge_max_tokens ... under a python: or rm: judge were ignored
    without a word (the label.py audit of session 68), as --principle under the default template was: refused in
    one line before any work, naming the setting, the judge and the fix. Their defaults, and what a judge reads, pass."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings

    marker_pairs(tmp_path)
    with pytest.raises(ConfigError, match=message):
        run_script("label.py", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--output", "o/p.jsonl", *args,
                   cwd=tmp_path)
    assert not (tmp_path / "o").exists()
    # The notebook's settings cell: the overrides key is named where the value was set.
    with pytest.raises(ConfigError, match=r"^overrides key 'principle' is read only by --judge openai or hf, not by "
                                          r"--judge python:x.py:judge"):
        parse_config(LabelSettings, [], overrides={"judge": "python:x.py:judge", "principle": "be short"},
                     env_file=None)
    # Each setting under its own source: the recipe's key, not a --flag never typed.
    (tmp_path / "recipe.yaml").write_text("judge: rm:runs/rm\njudge_base_url: http://127.0.0.1:9/v1\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{tmp_path / 'recipe.yaml'}: key judge_base_url is read only "
                                                          "by --judge openai, not by ")):
        parse_config(LabelSettings, ["--config", str(tmp_path / "recipe.yaml")], env_file=None)
    with pytest.raises(ConfigError, match=r"^--judge_max_tokens is read only by --judge openai or hf, not by --judge "
                                          r"rm:runs/rm, a reward model that scores each answer: drop it, or judge "
                                          r"with an LLM \(--judge openai or hf\)$"):
        parse_config(LabelSettings, ["--config", str(tmp_path / "recipe.yaml"), "--judge_max_tokens", "64"],
                     env_file=None)
    for fine in (["--judge", "python:x.py:judge", "--parallel", "3", "--judge_api_key_env", "OPENAI_API_KEY"],
                 ["--judge", "hf", "--judge_model", "m", "--judge_revision", "v2", "--judge_max_tokens", "64"],
                 ["--judge_model", "m", "--judge_template", "self_reference", "--principle", "be short"]):
        parse_config(LabelSettings, fine, env_file=None)


def test_a_judge_setting_from_the_environment_the_judge_never_reads_is_ignored(tmp_path, monkeypatch, alignkit_log):
    """The environment and .env are every script's: evaluate.py reads its judge from ALIGNKIT_JUDGE_MODEL, and
    rlaif.py's steps inherit it, so `label.py --preset tiny` (a rule judge) with it set was refused. A value from
    there that this judge does not read is left at its default, in one info line; one given for this run is refused."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings
    from alignkit.modeling import presets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGNKIT_JUDGE_MODEL", "gpt-4o-mini")
    (tmp_path / ".env").write_text("ALIGNKIT_JUDGE_BASE_URL=http://127.0.0.1:9/v1\n")
    s = parse_config(LabelSettings, ["--preset", "tiny"], presets=presets.named("label"))
    assert s.judge.startswith("python:") and s.judge_model is None and s.judge_base_url is None
    assert ("not read by --judge python:alignkit.modeling.presets:rule_judge, so left at the default: judge_model "
            "'gpt-4o-mini' (env var ALIGNKIT_JUDGE_MODEL), judge_base_url 'http://127.0.0.1:9/v1' (env var "
            "ALIGNKIT_JUDGE_BASE_URL (from .env))") in alignkit_log.text
    # What an LLM judge reads from there is read as before; a flag the judge does not read is still refused.
    assert parse_config(LabelSettings, ["--judge", "openai"], env_file=None).judge_model == "gpt-4o-mini"
    with pytest.raises(ConfigError, match=r"^--principle is read only by --judge openai or hf, not by --judge rm:r"):
        parse_config(LabelSettings, ["--judge", "rm:r", "--principle", "be short"], env_file=None)


def test_rate_limits_and_server_errors_are_retried(tmp_path):
    marker_pairs(tmp_path)
    attempts, times, lock = Counter(), {}, threading.Lock()

    def flaky(body):
        rid = request_id(body)
        with lock:
            attempts[rid] += 1
            n = attempts[rid]
            times.setdefault(rid, []).append(time.monotonic())
        if n == 1:
            return Fault(429, headers={"Retry-After": "1"})
        if n == 2:
            return Fault(500)
        return marker_judge(body)

    with FakeOpenAI(flaky) as server:
        summary = label(tmp_path, server, "--max_retries", "2")
        assert server.count == 30  # every judgment: 429, 500, then the answer
    assert summary["labeled"] == 5 and summary["errors"] == 0
    assert all(t[1] - t[0] >= 0.95 for t in times.values())  # Retry-After: 1 was honoured


def test_timeouts_and_garbage_verdicts_are_counted_and_a_rerun_retries_only_the_errors(tmp_path):
    prompts = marker_pairs(tmp_path)
    slow, garbage, healthy = prompts[0], prompts[1], [False]

    def responder(body):
        text = body["messages"][-1]["content"]
        if healthy[0]:
            return marker_judge(body)
        if slow in text:
            return Fault(200, delay=4.0)  # longer than the client's timeout
        if garbage in text:
            return "Both answers have merit; I cannot decide."
        return marker_judge(body)

    with FakeOpenAI(responder) as server:
        summary = label(tmp_path, server, "--request_timeout", "1", "--max_retries", "1")
        assert sum(slow in b["messages"][-1]["content"] for b in server.requests) == 4  # 2 orders x 2 attempts
        assert summary["errors"] == 1 and summary["parse_failures"] == 1 and summary["labeled"] == 3
        assert summary["judgments"]["failed"] == 2

        healthy[0], before = True, server.count  # the next run asks again only what failed
        summary = label(tmp_path, server)  # timeout and retries change how long it waits, not the answer: same key
        assert server.count - before == 2
        assert all(slow in b["messages"][-1]["content"] for b in server.requests[before:])
    assert summary["errors"] == 0 and summary["parse_failures"] == 1 and summary["labeled"] == 4


def test_the_judgment_cache_keys_on_every_judge_setting(tmp_path):
    """A cut-off answer (--judge_max_tokens 20) has no verdict: it stays cached under those settings, but a rerun
    with room to answer, another temperature or another server behind the same model name asks again."""
    marker_pairs(tmp_path)  # 5 pairs, 10 judgments

    def cut_short(body):  # what a real endpoint returns when max_tokens ends the answer before the verdict
        return "Response A is more detailed and" if body["max_tokens"] < 100 else marker_judge(body)

    def no_verdict(*flags):  # a failed run (status 2), its summary written
        with pytest.raises(UserError, match="^no pair was labeled: the judge gave no verdict"):
            label(tmp_path, server, *flags)
        return json.loads((tmp_path / "prefs.summary.json").read_text())

    with FakeOpenAI(cut_short) as server, FakeOpenAI(marker_judge) as other:
        short = no_verdict("--judge_max_tokens", "20")
        assert server.count == 10 and short["parse_failures"] == 5 and short["labeled"] == 0
        again = no_verdict("--judge_max_tokens", "20")
        assert server.count == 10 and again["parse_failures"] == 5  # paid answers are kept, not bought again

        full = label(tmp_path, server)  # the default 2048: another setting, so every judgment is asked again
        assert server.count == 20 and {b["max_tokens"] for b in server.requests[10:]} == {2048}
        assert full["labeled"] == 5 and full["parse_failures"] == 0

        warm = label(tmp_path, server, "--judge_temperature", "0.7")
        assert server.count == 30 and {b["temperature"] for b in server.requests[20:]} == {0.7}
        assert warm["judgments"]["sent_this_run"] == 10

        moved = label(tmp_path, other)  # same model name, another server: never answered from the first one's cache
        assert other.count == 10 and moved["judgments"]["from_cache"] == 0 and moved["labeled"] == 5
        assert server.count == 30

        back = label(tmp_path, server)  # and each setting's answers are still there when it comes back
        assert server.count == 30 and back["judgments"]["from_cache"] == 10


def test_unparsable_verdicts_stay_cached_until_retry_parse_failures(tmp_path):
    prompts = marker_pairs(tmp_path)
    undecided, decided = prompts[2], [False]

    def responder(body):  # undecided about one prompt on the first run, decided from then on
        if undecided in body["messages"][-1]["content"] and not decided[0]:
            return "Both answers have merit; I cannot decide."
        return marker_judge(body)

    with FakeOpenAI(responder) as server:
        first = label(tmp_path, server)
        assert server.count == 10 and first["parse_failures"] == 1 and first["labeled"] == 4
        decided[0] = True
        kept = label(tmp_path, server)  # the same settings: the paid answers are the answers
        assert server.count == 10 and kept["parse_failures"] == 1
        retried = label(tmp_path, server, "--retry_parse_failures")
        assert server.count == 12 and all(undecided in b["messages"][-1]["content"] for b in server.requests[10:])
        assert retried["parse_failures"] == 0 and retried["labeled"] == 5
        label(tmp_path, server, "--retry_parse_failures")  # nothing left without a verdict: nothing asked
        assert server.count == 12
    records = rows(tmp_path / "prefs.cache" / "judgments.jsonl")
    assert len(records) == 12  # the first answers stay in the log; the new ones, appended, are the ones used


def test_response_cache_keys_on_the_endpoint_and_the_sampling(tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"explain topic {i}"} for i in range(3)])
    args = ["--mode", "completions", "--prompts", "prompts.jsonl", "--model_a", "openai:teacher", "--output", "t.jsonl"]
    with FakeOpenAI(lambda body: "from the first server") as first, \
            FakeOpenAI(lambda body: "from the second server") as second:
        run_script("label.py", *args, "--generation_base_url", first.base_url, cwd=tmp_path)
        run_script("label.py", *args, "--generation_base_url", second.base_url, cwd=tmp_path)
        assert first.count == 3 and second.count == 3  # same model name, another server: asked
        assert {r["completion"][0]["content"] for r in rows(tmp_path / "t.jsonl")} == {"from the second server"}
        run_script("label.py", *args, "--generation_base_url", first.base_url, "--max_new_tokens", "64", cwd=tmp_path)
        assert first.count == 6 and {b["max_tokens"] for b in first.requests[3:]} == {64}
        run_script("label.py", *args, "--generation_base_url", first.base_url, cwd=tmp_path)
        assert first.count == 6  # its own earlier answers


def test_greedy_responses_are_found_under_another_seed_and_under_their_old_keys(tmp_path, monkeypatch):
    """Greedy decoding (--temperature 0) reads neither the seed nor --top_p, but responses keyed on both, so another
    --seed generated (and paid for) every greedy response again. Keys drop them there; a response cached under a key
    that held them is found, and kept under the new key too, so the next seed finds it as well. Sampled responses still
    key on the seed (another seed is another sample)."""
    from alignkit.feedback import labeling

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"explain topic {i}"} for i in range(3)])
    args = ["--mode", "completions", "--prompts", "prompts.jsonl", "--model_a", "openai:teacher", "--output", "t.jsonl"]
    with FakeOpenAI(lambda body: "an answer") as server:
        url = ["--generation_base_url", server.base_url]
        with monkeypatch.context() as old:  # keyed as before: the seed and top_p in every key
            old.setattr(labeling, "decisive_sampling", dict)
            run_script("label.py", *args, *url, "--temperature", "0", "--seed", "1", cwd=tmp_path)
        assert server.count == 3
        run_script("label.py", *args, *url, "--temperature", "0", "--seed", "1", cwd=tmp_path)
        assert server.count == 3  # found under the old keys
        run_script("label.py", *args, *url, "--temperature", "0", "--seed", "2", "--top_p", "0.5", cwd=tmp_path)
        assert server.count == 3  # and kept under the new ones
        run_script("label.py", *args, *url, "--temperature", "0.7", "--seed", "1", cwd=tmp_path)
        run_script("label.py", *args, *url, "--temperature", "0.7", "--seed", "2", cwd=tmp_path)
        assert server.count == 9  # sampled: each seed its own answers
        run_script("label.py", *args, *url, "--temperature", "0.7", "--seed", "1", cwd=tmp_path)
        assert server.count == 9


def test_local_generator_and_judge_identities_cover_the_loader_and_sampling():
    """The key of a local model's answer changes with each setting that changes the weights as loaded, the engine
    or the sampling; it does not change with settings that only change speed."""
    import types

    from alignkit.core.config import LabelSettings, ModelSettings
    from alignkit.feedback.judge import HFJudge
    from alignkit.feedback.label_records import Source
    from alignkit.feedback.labeling import _generator_identities

    source = Source("some/model", "some/model", "local", 0)

    def generator_key(backend="transformers", **changes):
        run = types.SimpleNamespace(settings=LabelSettings(model_id="some/model", **changes), backend=backend)
        return json.dumps(_generator_identities(run, source)[0], sort_keys=True)

    base = generator_key()
    changed = [generator_key(dtype="bf16"), generator_key(quantization="4bit"), generator_key(backend="vllm"),
               generator_key(revision="v2"), generator_key(max_new_tokens=7), generator_key(temperature=0.1),
               generator_key(top_p=0.5), generator_key(seed=1), generator_key(attn_implementation="eager"),
               generator_key(chat_template_kwargs={"enable_thinking": False})]
    assert len({base, *changed}) == len(changed) + 1
    assert generator_key(generation_batch_size=3, parallel=2) == base
    greedy = generator_key(temperature=0.0)  # reads neither the seed nor top_p
    assert generator_key(temperature=0.0, seed=1, top_p=0.5) == greedy != base
    # Unset, the setting added later is left out: answers cached before it existed are still found.
    assert "chat_template_kwargs" not in json.loads(base)["loaded"]["loader"]

    template = load_template("default")

    def judge_key(max_tokens=1024, temperature=0.0, batch_size=16, **changes):
        settings = ModelSettings(model_id="judge/model", **changes)
        return json.dumps(HFJudge(settings, template, max_tokens, temperature, batch_size).identity(), sort_keys=True)

    base = judge_key()
    changed = [judge_key(revision="v2"), judge_key(dtype="fp16"), judge_key(quantization="8bit"),
               judge_key(max_tokens=20), judge_key(temperature=0.5)]
    assert len({base, *changed}) == len(changed) + 1
    assert judge_key(batch_size=2) == base
    from alignkit.feedback.judge import make_judge

    hf = make_judge(LabelSettings(judge="hf", judge_model="judge/model", judge_revision="v2", dtype="fp16"))
    loader = hf.identity()["model"]["loader"]
    assert (loader["revision"], loader["dtype"]) == ("v2", "fp16")  # --judge_revision reaches it
    # The generators' --chat_template_kwargs are theirs: the judge's verdicts keep their key (it does not apply them).
    thinking = LabelSettings(judge="hf", judge_model="judge/model", judge_revision="v2", dtype="fp16",
                             chat_template_kwargs={"enable_thinking": False})
    assert make_judge(thinking).identity() == hf.identity()


def test_a_killed_run_resumes_without_repeating_a_request(tmp_path):
    """SIGKILL a real label.py process after 6 judgments are cached; the rerun asks only for the rest."""
    prompts = marker_pairs(tmp_path, n=12, identical=False)  # 24 judgments
    phase, answered, lock, release = [1], [], threading.Lock(), threading.Event()

    def responder(body):
        with lock:
            allowed = phase[0] == 2 or sum(p == 1 for p, _ in answered) < 6
            if allowed:
                answered.append((phase[0], request_id(body)))
        if not allowed:  # run 1 after 6 answers: hang like a stuck server until the test lets go
            release.wait(30)
            return Fault(503)
        return marker_judge(body)

    args = ["--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge_model", "fake-judge",
            "--output", "prefs.jsonl", "--parallel", "2"]
    cache = tmp_path / "prefs.cache" / "judgments.jsonl"
    with FakeOpenAI(responder) as server:
        log = open(tmp_path / "run1.log", "w")
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "label.py"), *args, "--judge_base_url", server.base_url], cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not cache.is_file() or cache.read_bytes().count(b"\n") < 6:
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()
            assert time.monotonic() < deadline, "label.py cached nothing within a minute"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        seen_in_run1 = server.count
        release.set()
        with open(cache, "ab") as f:  # and suppose it died in the middle of writing a line
            f.write(b'{"key": "4f2a", "judge": "openai:fake-judge", "te')

        with lock:
            phase[0] = 2
        summary = label(tmp_path, server, "--parallel", "2")
        # Not a request the killed run left half-sent (its connection reaches the server late, with no body).
        run2 = [request_id(b) for b in server.requests[seen_in_run1:] if "messages" in b]
        answered_in_run1 = {rid for p, rid in answered if p == 1}
        assert len(answered_in_run1) == 6 and not answered_in_run1 & set(run2)  # nothing answered is asked again
        all_answered = [rid for _, rid in answered]
        assert len(all_answered) == len(set(all_answered)) == 24  # each judgment answered exactly once
        assert summary["judgments"] == {"needed": 24, "sent_this_run": 18, "from_cache": 6, "failed": 0}

        out = rows(tmp_path / "prefs.jsonl")
        assert [r["prompt"][0]["content"] for r in out] == prompts  # each pair once, in prompt order
        assert all("MARKER" in r["chosen"][0]["content"] for r in out)
        before = server.count
        label(tmp_path, server, "--parallel", "2")  # a third run has nothing left to ask
        assert server.count == before and rows(tmp_path / "prefs.jsonl") == out


def test_teacher_completions_from_an_endpoint_are_sft_data(tmp_path):
    prompts = [f"explain topic {i}" for i in range(5)]
    write_jsonl(tmp_path / "prompts.jsonl", [{"question": p} for p in prompts + prompts[:2]])  # 2 repeats
    teacher = lambda body: f"The teacher explains: {body['messages'][-1]['content']}"  # noqa: E731
    args = ["--mode", "completions", "--prompts", "prompts.jsonl", "--prompt_field", "question", "--model_a",
            "openai:teacher", "--output", "teacher.jsonl"]
    with FakeOpenAI(teacher) as server:
        run_script("label.py", *args, "--generation_base_url", server.base_url, cwd=tmp_path)
        assert server.count == 5 and {b["model"] for b in server.requests} == {"teacher"}
        run_script("label.py", *args, "--generation_base_url", server.base_url, cwd=tmp_path)
        assert server.count == 5  # cached responses are never generated again
    sft = load_sft(str(tmp_path / "teacher.jsonl"))  # sft.py's loader reads it as it is
    assert len(sft) == 5 and sft[0]["prompt"] == [{"role": "user", "content": prompts[0]}]
    assert sft[0]["completion"][0]["content"] == f"The teacher explains: {prompts[0]}"


def test_a_teacher_whose_every_answer_is_empty_fails_in_one_line(tmp_path):
    """It ended with status 0, an empty output and "nothing to train on"; as pairs and pointwise modes where the
    judge or grader gave nothing usable, it is a failed run naming the teacher."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"explain topic {i}"} for i in range(3)])
    args = ["--mode", "completions", "--prompts", "prompts.jsonl", "--model_a", "openai:teacher", "--output", "t.jsonl"]
    with FakeOpenAI(lambda body: "  ") as server:
        with pytest.raises(UserError, match=r"^no completion was written: all 6 of the teacher's answers were empty "
                                            r"\(they are in t\.cache/responses\.jsonl\): check the teacher "
                                            r"\(openai:teacher\): .* once t\.cache/responses\.jsonl is deleted"):
            run_script("label.py", *args, "--num_samples", "2", "--generation_base_url", server.base_url,
                       cwd=tmp_path)
    assert json.loads((tmp_path / "t.summary.json").read_text())["empty"] == 6
    (tmp_path / "t.cache" / "responses.jsonl").unlink()  # the served model fixed: the same command asks again
    with FakeOpenAI(lambda body: "An answer.") as server:
        run_script("label.py", *args, "--num_samples", "2", "--generation_base_url", server.base_url, cwd=tmp_path)
        assert server.count == 6
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 6


def test_endpoint_generators_against_a_python_verifier(tmp_path):
    """Pairs from two openai:MODEL generators, judged by a function in a .py file."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {i} + {i}?"} for i in range(4)])
    (tmp_path / "verify.py").write_text(
        "import re\n"
        "def judge(prompt, answer_a, answer_b):\n"
        "    x = int(re.findall(r'\\d+', prompt)[0]) * 2\n"
        "    ok_a, ok_b = answer_a.strip() == str(x), answer_b.strip() == str(x)\n"
        "    return 'A' if ok_a > ok_b else 'B' if ok_b > ok_a else 'tie'\n"
    )

    def generators(body):
        x = int(re.findall(r"\d+", body["messages"][-1]["content"])[0])
        return str(2 * x) if body["model"] == "good" or x == 0 else str(2 * x + 1)

    with FakeOpenAI(generators) as server:
        run_script("label.py", "--prompts", "prompts.jsonl", "--model_a", "openai:bad", "--model_b", "openai:good",
                   "--generation_base_url", server.base_url, "--judge", "python:verify.py:judge", "--output", "v.jsonl",
                   cwd=tmp_path)
    summary = json.loads((tmp_path / "v.summary.json").read_text())
    out = rows(tmp_path / "v.jsonl")
    assert summary["skipped"]["identical"] == 1 and summary["labeled"] == 3  # 0 + 0: both right, same text
    assert all(r["chosen_source"] == "openai:good" for r in out)
    assert all(r["chosen"][0]["content"] == str(2 * int(r["prompt"][0]["content"].split()[2])) for r in out)


def test_a_refused_key_stops_the_run_at_once(tmp_path):
    marker_pairs(tmp_path)
    refuse = Fault(401, body='{"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}')
    with FakeOpenAI(lambda body: refuse) as server:
        with pytest.raises(RuntimeError, match=r"the judge refused the request.*Check the API key") as refused:
            label(tmp_path, server, "--parallel", "1")
        assert isinstance(refused.value, UserError)  # the user fixes the key: `error: ...`, exit 2, no traceback
        assert server.count <= 2  # not one failure per pair: every further request would be refused too


def test_push_to_hub_is_private_by_default_and_needs_a_token(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    marker_pairs(tmp_path)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    pushed = {}
    monkeypatch.setattr(datasets.Dataset, "push_to_hub",
                        lambda self, repo_id, **kw: pushed.update(repo_id=repo_id, rows=self.to_list(), **kw))
    with FakeOpenAI(marker_judge) as server:
        with monkeypatch.context() as online:  # offline, that is said first (a token would not help)
            online.delenv("HF_HUB_OFFLINE")
            online.setattr(constants, "HF_HUB_OFFLINE", False)
            with pytest.raises(ValueError, match="HF_TOKEN"):
                label(tmp_path, server, "--push_to_hub", "--hub_repo_id", "me/prefs")
        assert server.count == 0  # no token: stopped before judging anything
        with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 is set"):
            label(tmp_path, server, "--push_to_hub", "--hub_repo_id", "me/prefs")
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_0123456789")
        # A token, but no Hub to push to (offline, as here): stopped before judging too, not at the push.
        with pytest.raises(UserError, match=r"^pushing to the Hub needs the Hub, and HF_HUB_OFFLINE=1 is set: run "
                                            r"where it answers"):
            label(tmp_path, server, "--push_to_hub", "--hub_repo_id", "me/prefs")
        assert server.count == 0
        from alignkit.core import sources

        monkeypatch.setattr(sources, "push_unreachable", lambda: None)  # a Hub that answers (its push faked)
        label(tmp_path, server, "--push_to_hub", "--hub_repo_id", "me/prefs")
    assert pushed["repo_id"] == "me/prefs" and pushed["private"] is True
    assert pushed["rows"] == rows(tmp_path / "prefs.jsonl") and len(pushed["rows"]) == 5
    assert "hf_fake_token" not in (tmp_path / "prefs.config.json").read_text()


# ------------------------------------------------------------------------------------------- bad input, fast
@pytest.mark.parametrize("args, error, message", [
    ([], ConfigError, r"OPENAI_API_KEY is not set"),
    (["--judge_base_url", "http://127.0.0.1:9/v1", "--judge_api_key_env", "MY_JUDGE_KEY"], ConfigError,
     r"MY_JUDGE_KEY is not set"),
    (["--judge", "python:no_such_module:judge"], ConfigError, r"cannot import no_such_module \(ModuleNotFoundError: "
     r".*\); expected --judge python:MODULE:FUNCTION"),
    # The form right, the code wrong: its error and the file to fix (it said the form was wrong too).
    (["--judge", "python:broken.py:judge"], ConfigError, r"^--judge 'python:broken.py:judge': cannot import broken.py "
     r"\(SyntaxError: .*\); fix broken.py, then run again$"),
    (["--judge", "python:needs.py:judge"], ConfigError, r"^--judge 'python:needs.py:judge': cannot import needs.py "
     r"\(ModuleNotFoundError: No module named 'no_such_package'\); install no_such_package \(pip install \.\.\.\), or "
     r"fix needs.py, then run again$"),
    (["--judge", "python:alignkit.no_such_module:judge"], ConfigError, r"cannot import alignkit.no_such_module .*; "
     r"expected --judge python:MODULE:FUNCTION"),
    (["--judge", "python:missing.py:judge"], ConfigError, r"^--judge 'python:missing.py:judge': no such file missing.py "
     r"\(a relative path is read from "),
    (["--judge", "python:alignkit.modeling.presets:score"], ConfigError, r"must accept \(prompt, answer_a, answer_b\)"),
    (["--judge", "hf"], ConfigError, r"--judge hf needs --judge_model"),
    (["--judge_template", "mine.jsonl"], ConfigError, r"no such file"),
    (["--num_samples", "4"], ConfigError, r"cannot be combined with --model_a"),
    (["--output", "prefs.csv"], ConfigError, r"name a .jsonl file"),
])
def test_bad_settings_fail_before_any_work(tmp_path, args, error, message):
    marker_pairs(tmp_path)
    (tmp_path / "broken.py").write_text("def judge(prompt, a, b)\n    return 'A'\n")
    (tmp_path / "needs.py").write_text("import no_such_package\n\ndef judge(prompt, a, b):\n    return 'A'\n")
    with pytest.raises(error, match=message):
        run_script("label.py", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--output", "o/p.jsonl",
                   *args, cwd=tmp_path)
    assert not (tmp_path / "o").exists()  # nothing written, nothing cached


def test_bad_rows_name_the_file_row_and_field(tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": "   "}])
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "fine", "response": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "fine", "reply": "y"}])
    common = ["--responses_a", "a.jsonl", "--judge", "python:alignkit.modeling.presets:rule_judge",
              "--output", "p.jsonl"]
    with pytest.raises(DataError, match=r"prompts.jsonl: row 2: field 'prompt': expected non-empty text"):
        run_script("label.py", *common, "--responses_b", "b.jsonl", "--prompts", "prompts.jsonl", cwd=tmp_path)
    with pytest.raises(DataError, match=r"prompts.jsonl: no column 'text' .*Pass --prompt_field"):
        run_script("label.py", *common, "--responses_b", "b.jsonl", "--prompts", "prompts.jsonl",
                   "--prompt_field", "text", cwd=tmp_path)
    with pytest.raises(DataError, match=r"b.jsonl: no response column .*columns: prompt, reply.*--response_field"):
        run_script("label.py", *common, "--responses_b", "b.jsonl", cwd=tmp_path)
    # A row without the field (a misspelt key) is named, not read as an empty cell: its pair was skipped silently,
    # the prompt's said "got None".
    write_jsonl(tmp_path / "typo.jsonl", [{"prompt": "fine", "response": "y"}, {"prompt": "z", "respones": "w"}])
    with pytest.raises(DataError, match=r"^.*typo.jsonl: row 2: no field 'response' \(is 'respones' a misspelling of "
                                        r"it\?\); its fields: prompt, respones. Fix the row.$"):
        run_script("label.py", *common, "--responses_b", "typo.jsonl", cwd=tmp_path)
    write_jsonl(tmp_path / "promt.jsonl", [{"prompt": "fine"}, {"promt": "z"}])
    with pytest.raises(DataError, match=r"promt.jsonl: row 2: no field 'prompt' \(is 'promt' a misspelling of it\?\)"):
        run_script("label.py", *common, "--responses_b", "a.jsonl", "--prompts", "promt.jsonl", cwd=tmp_path)


def test_hh_prompts_are_labeled_as_their_turns(tmp_path):
    """Prompts from split HH data reach the generators and the output as user/assistant turns, not as one user
    message holding literal Human:/Assistant: markers."""
    hh = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: How long should it rise?" \
         "\n\nAssistant:"
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": hh, "response": "About an hour."}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": hh, "response": "Two days."}])
    run_script("label.py", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge",
               "python:alignkit.modeling.presets:rule_judge", "--output", "p.jsonl", cwd=tmp_path)
    from alignkit.feedback.label_inputs import _as_messages

    turns = [{"role": "user", "content": "How do I bake bread?"},
             {"role": "assistant", "content": "Mix flour and water."},
             {"role": "user", "content": "How long should it rise?"}]
    assert _as_messages(hh, "here") == turns
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["pairs"] == 1 and summary["skipped"]["missing"] == 0  # responses matched to the parsed prompt
    with pytest.raises(DataError, match=r"here: .*turn 1 \(Human\): expected non-empty text"):
        _as_messages("\n\nHuman: \n\nAssistant:", "here")


def test_help_shows_every_setting(capsys):
    from dataclasses import fields

    from alignkit.core.config import LabelSettings

    with pytest.raises(SystemExit) as exit_:
        run_script("label.py", "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f.name}" in text for f in fields(LabelSettings))


# ------------------------------------------------------------------------------------------- tiny preset
def test_tiny_preset_labels_offline_and_dpo_learns_from_the_labels(tiny_cache, tmp_path, capsys):
    from alignkit.modeling import presets

    run_script("label.py", "--preset", "tiny", cwd=tmp_path)
    # The hint names its own run folder: the preset's (runs/tiny-dpo) would move the user's earlier DPO run aside
    # (the README walk of session 30).
    assert "train on it: python dpo.py --preset tiny --dataset_id runs/label-tiny/preferences.jsonl --run_name " \
        "tiny-dpo-on-preferences\n" in capsys.readouterr().out
    out = tmp_path / "runs" / "label-tiny" / "preferences.jsonl"
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    labeled = rows(out)
    assert len(labeled) == summary["labeled"] >= 200
    assert summary["agreement"] == 1.0 and summary["errors"] == summary["parse_failures"] == 0
    for r in labeled:  # the rule judge's labels are checkable
        prompt = r["prompt"][0]["content"]
        assert presets.score(prompt, r["chosen"][0]["content"]) > presets.score(prompt, r["rejected"][0]["content"])

    dpo = run_script("dpo.py", "--preset", "tiny", "--dataset_id", str(out), "--output_dir", str(tmp_path / "runs"),
                     "--run_name", "dpo-on-labels", cwd=tmp_path)
    assert dpo["metrics"]["eval_rewards/accuracies"] > 0.7


def test_a_local_model_can_judge(tiny_cache, tmp_path, alignkit_log):
    """--judge hf runs batched through a local model; the tiny one writes no verdicts, which are counted. Its
    context (128 tokens) is shorter than the judge prompts: said once, in alignkit's words."""
    from alignkit.modeling import presets

    try:  # without one verdict, a failed run (its summary written)
        run_script("label.py", "--preset", "tiny", "--num_samples", "2", "--max_prompts", "3", "--judge", "hf",
                   "--judge_model", presets.paths()["model"], "--judge_max_tokens", "8", "--output", "hf.jsonl",
                   cwd=tmp_path)
    except UserError as error:
        assert str(error).startswith("no pair was labeled: the judge gave no verdict"), error
    summary = json.loads((tmp_path / "hf.summary.json").read_text())
    assert summary["judge"].startswith("hf:") and summary["errors"] == 0
    assert summary["pairs_judged"] == summary["parse_failures"] + summary["ties"] + summary["disagreements"] \
        + summary["labeled"] > 0
    assert alignkit_log.text.count("judge prompts (up to") == 1
    assert "with --judge_max_tokens 8 exceed" in alignkit_log.text and "context of 128 tokens" in alignkit_log.text


# ------------------------------------------------------------------------------------------- generation backends
def write_prompts(tmp_path: Path, n: int = 5) -> list[str]:
    prompts = [f"name three fruits, take {i}." for i in range(n)]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    return prompts


def test_backend_vllm_without_vllm_stops_before_any_model_load(tmp_path, monkeypatch):
    import importlib.util

    from alignkit.modeling import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    write_prompts(tmp_path)
    with pytest.raises(ConfigError, match=r"--backend vllm needs vLLM: pip install vllm"):
        run_script("label.py", "--mode", "completions", "--model_a", "some/model", "--prompts", "prompts.jsonl",
                   "--backend", "vllm", "--output", "o/t.jsonl", cwd=tmp_path)
    assert not (tmp_path / "o").exists()  # nothing written, nothing cached


def test_vllm_backend_writes_what_transformers_writes_and_resumes_after_a_crash(sft_run, tmp_path, monkeypatch):
    """The same chunks, seeds and output format on both backends; vLLM (faked: no GPU here) gets the adapter as
    a LoRA request on its base, and a run that dies mid-way resumes from the chunks already cached."""
    from fake_vllm import install

    from alignkit.modeling import generation, models, presets

    prompts = write_prompts(tmp_path)
    adapter = str(sft_run["run_folder"])
    args = ["--mode", "completions", "--model_a", adapter, "--prompts", "prompts.jsonl", "--max_new_tokens", "4",
            "--temperature", "0.7", "--top_p", "0.9", "--generation_batch_size", "2"]
    calls, real = [], generation.generate

    def spy(model, tokenizer, conversations, **kw):
        calls.append((conversations, kw))
        return real(model, tokenizer, conversations, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    run_script("label.py", *args, "--backend", "transformers", "--output", "hf.jsonl", cwd=tmp_path)
    # auto: no vLLM here, so transformers (in a folder of its own: label.py reads the responses cached beside it)
    run_script("label.py", *args, "--output", "auto/auto.jsonl", cwd=tmp_path)
    assert [c for c, _ in calls[:3]] == [c for c, _ in calls[3:]]  # both runs asked the same
    hf, hf_summary = rows(tmp_path / "hf.jsonl"), json.loads((tmp_path / "hf.summary.json").read_text())
    assert rows(tmp_path / "auto" / "auto.jsonl") == hf and len(hf) == 5
    transformers_calls = calls[:3]

    fake = install(monkeypatch, cuda=True)  # auto now finds vLLM and a GPU
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("vLLM was chosen: no transformers model"))
    fake.fail_on_call = 2  # the engine dies on the second chunk
    with pytest.raises(RuntimeError, match="fake vLLM engine died"):
        run_script("label.py", *args, "--output", "vllm.jsonl", cwd=tmp_path)
    cached = rows(tmp_path / "vllm.cache" / "responses.jsonl")
    assert [r["text"] for r in cached] == [f"vllm says: {p}" for p in prompts[:2]]  # the first chunk was kept
    fake.fail_on_call = None
    run_script("label.py", *args, "--output", "vllm.jsonl", cwd=tmp_path)

    first_run, second_run = fake.llms
    assert [len(c["messages"]) for c in second_run.chats] == [2, 1]  # only the three prompts still missing
    chats = first_run.chats + second_run.chats
    # The same chunks and per-prompt seeds as transformers got, and the sampling flags.
    assert [(c["messages"], [p["seed"] for p in c["params"]]) for c in chats] == \
        [(c, kw["seeds"]) for c, kw in transformers_calls]
    assert all(p == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 4, "seed": p["seed"]}
               for c in chats for p in c["params"])
    base = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).resolve() == Path(presets.paths()["model"]).resolve()
    for llm in fake.llms:
        assert llm.kwargs["model"] == base and llm.kwargs["enable_lora"] is True
        assert llm.kwargs["tokenizer"] == adapter  # the SFT run saved its tokenizer (and chat template) there
    assert all(c["lora"].lora_path == adapter and c["chat_template"] for c in chats)

    out = rows(tmp_path / "vllm.jsonl")
    assert [r["completion"] for r in out] == [[{"role": "assistant", "content": f"vllm says: {p}"}] for p in prompts]
    assert [{k: v for k, v in r.items() if k != "completion"} for r in out] == \
        [{k: v for k, v in r.items() if k != "completion"} for r in hf]  # prompt, generator: as transformers wrote
    assert len(load_sft(str(tmp_path / "vllm.jsonl"))) == 5  # sft.py reads it as it is
    summary = json.loads((tmp_path / "vllm.summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "output"} == {k: v for k, v in hf_summary.items() if k != "output"}


def test_a_second_run_into_the_same_output_is_refused_before_it_writes_anything(tiny_cache, tmp_path):
    """A label.py run refused as "in use" still overwrote the running run's .config.json first, so the record
    said temperature 0.3 of data sampled at 1.0. The caches take the lock before anything is written now."""
    import fcntl

    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings
    from alignkit.core.journal import InUse
    from alignkit.feedback.labeling import prepare
    from alignkit.modeling import presets

    out = tmp_path / "prefs.jsonl"
    config = out.with_suffix(".config.json")
    config.write_text('{"temperature": 1.0}')
    cache = out.with_suffix(".cache")
    cache.mkdir()
    s = parse_config(LabelSettings, args=["--preset", "tiny", "--output", str(out), "--temperature", "0.3"],
                     env_file=None, presets=presets.named("label"))
    with open(cache / "responses.jsonl", "a+b") as running:  # the running run holds its caches' lock
        fcntl.flock(running.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InUse, match="in use by another label.py run"):
            prepare(s)
    assert config.read_text() == '{"temperature": 1.0}'


def test_a_prompt_s_tool_calls_reach_the_generator_and_the_judge(tmp_path):
    """Generation prompts (label.py, evaluate.py, rl.py) kept role and content only: a context with a tool call
    (content null, OpenAI's form) was refused, one with text beside the call lost the call, and a context ending
    with the tool's result was refused. Kept now as training data keeps them; an OpenAI-compatible generator gets
    them in the API's form (an id per call, arguments as JSON text, the tool turn naming its call), a judge reads
    the calls in the transcript."""
    from alignkit.core.llm import ChatClient
    from alignkit.feedback.judge import question_text
    from alignkit.feedback.labeling import read_prompts

    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    context = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None,
                                                                 "tool_calls": [call]},
               {"role": "tool", "name": "weather", "content": "sunny"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": context}) + "\n" + json.dumps({"prompt": "Plain?"}) + "\n")
    with_call, plain = read_prompts(str(path))
    assert with_call.messages == [context[0], {"role": "assistant", "content": "", "tool_calls": [call]}, context[2]]
    assert plain.messages == [{"role": "user", "content": "Plain?"}]
    assert '[calls weather({"city": "Oslo"})]' in question_text(with_call.messages)
    seen = []
    with FakeOpenAI(lambda body: seen.append(body) or "It is sunny.") as server:
        client = ChatClient("gen", base_url=server.base_url)
        assert client.complete(with_call.messages) == "It is sunny."
        client.complete(plain.messages)
    assert seen[0]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    assert seen[1]["messages"] == [{"role": "user", "content": "Plain?"}]
    # A call's own id stays; a new one is none the data already uses, and each tool turn answers its call in order.
    from alignkit.core.llm import openai_messages

    named = [{**call, "id": "call_1"}, call]
    sent = openai_messages([context[0], {"role": "assistant", "content": "", "tool_calls": named},
                            {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}])
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_1", "call_2"]
    assert [m["tool_call_id"] for m in sent[2:]] == ["call_1", "call_2"]


def test_a_prompt_s_tool_call_needs_a_template_that_renders_it(tiny_cache, tmp_path):
    """label.py's and evaluate.py's local generators rendered a prompt with a tool call through a template that
    drops it: the model answered a conversation without the call. Refused in one line, as training refuses it; a
    template that renders calls renders it."""
    from transformers import AutoTokenizer

    from alignkit.core.errors import UserError
    from alignkit.modeling import presets
    from alignkit.modeling.template_rows import render

    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    prompt = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "name": "weather", "content": "sunny"}]
    tok = AutoTokenizer.from_pretrained(presets.paths()["model"])
    assert render(tok, prompt[:1])  # no call: renders as before
    with pytest.raises(UserError, match=r"chat template does not render tool calls, and a prompt \(.*Weather\?.*\) "
                                        r"has them"):
        render(tok, prompt)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if 'tool_calls' in m %}{% for c in "
        "m['tool_calls'] %}[call {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}]{% endfor %}"
        "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert '[call weather {"city": "Oslo"}]' in render(tok, prompt)


# ------------------------------------------------------------------------------ a prompt's own template arguments
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_a_prompt_s_tools_and_template_arguments_reach_an_endpoint_and_its_output_rows(tmp_path):
    """A prompts file's `tools` and `chat_template_kwargs` columns (TRL's per-row template arguments: tool-calling
    sets, {"enable_thinking": false}) were dropped: the generator answered without the tools, two rows differing
    only in their tools counted as one, and the output had no tools for sft.py/dpo.py to train with. They go to an
    OpenAI-compatible generator as the API's `tools` and vLLM's `chat_template_kwargs`, into the cache key and
    into each output row."""
    ask = [{"role": "user", "content": "what is the weather in Paris?"}]
    write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": ask, "tools": [WEATHER], "chat_template_kwargs": {"enable_thinking": False}},
        {"prompt": ask, "tools": json.dumps([CLOCK])},  # JSON text, as Hub datasets often store them
        {"prompt": [{"role": "user", "content": "hi"}]},
    ])
    args = ["--mode", "completions", "--prompts", "prompts.jsonl", "--model_a", "openai:teacher", "--output", "t.jsonl"]
    with FakeOpenAI(lambda body: f"answer with {len(body.get('tools') or [])} tools") as server:
        run_script("label.py", *args, "--generation_base_url", server.base_url, cwd=tmp_path)
        assert server.count == 3  # the same turns with other tools are another prompt
        sent = {json.dumps(b.get("tools")): b for b in server.requests}
        assert sent[json.dumps([WEATHER])]["chat_template_kwargs"] == {"enable_thinking": False}
        assert "chat_template_kwargs" not in sent[json.dumps([CLOCK])] and "tools" not in sent["null"]
        # Answered in text: a call alone would be an empty answer.
        assert sent[json.dumps([CLOCK])]["tool_choice"] == "none" and "tool_choice" not in sent["null"]
        out = rows(tmp_path / "t.jsonl")
        assert [r.get("tools") for r in out] == [[WEATHER], [CLOCK], None]
        assert [r.get("chat_template_kwargs") for r in out] == [{"enable_thinking": False}, None, None]
        # Another tool for the second row: only that prompt is generated again.
        write_jsonl(tmp_path / "prompts.jsonl", [
            {"prompt": ask, "tools": [WEATHER], "chat_template_kwargs": {"enable_thinking": False}},
            {"prompt": ask, "tools": [WEATHER, CLOCK]},
            {"prompt": [{"role": "user", "content": "hi"}]},
        ])
        run_script("label.py", *args, "--generation_base_url", server.base_url, cwd=tmp_path)
        assert server.count == 4 and len(server.requests[-1]["tools"]) == 2
        # --chat_template_kwargs goes to every prompt, the row's own on top, and counts in the cache: all again.
        run_script("label.py", *args, "--generation_base_url", server.base_url, "--chat_template_kwargs",
                   '{"enable_thinking": true, "style": "terse"}', cwd=tmp_path)
        assert server.count == 7  # the prompts are sent side by side: matched by their tools, not their order
        assert {len(b.get("tools") or []): b.get("chat_template_kwargs") for b in server.requests[-3:]} == {
            1: {"enable_thinking": False, "style": "terse"}, 2: {"enable_thinking": True, "style": "terse"},
            0: {"enable_thinking": True, "style": "terse"}}
    # A responses file without template columns (evaluate.py's, or label.py's before them) pairs by the turns; one
    # whose rows name other tools is named as such.
    write_jsonl(tmp_path / "plain.jsonl", [{"prompt": ask, "response": "plain"}])
    write_jsonl(tmp_path / "other.jsonl", [{"prompt": ask, "tools": [CLOCK], "response": "other"}])
    pairs = ["--prompts", "prompts.jsonl", "--judge", "python:alignkit.modeling.presets:rule_judge", "--output"]
    with FakeOpenAI(lambda body: "x") as server:
        plain = run_script("label.py", "--responses_a", "plain.jsonl", "--model_b", "openai:b", *pairs, "p.jsonl",
                           "--generation_base_url", server.base_url, cwd=tmp_path)
    assert plain["responses"][0] == ["plain", "plain", None]  # both prompts with its turns; "hi" it lacks
    with pytest.raises(DataError, match=r"other\.jsonl: none of its 1 prompts .*\(the same turns with other tools or "
                                        r"chat_template_kwargs columns\)\. Give its rows the same tools"):
        run_script("label.py", "--responses_a", "plain.jsonl", "--responses_b", "other.jsonl", *pairs, "q.jsonl",
                   cwd=tmp_path)
    sft = load_sft(str(tmp_path / "t.jsonl"))  # sft.py reads the output with its tools, as TRL does
    assert len(sft) == 3 and "get_weather" in json.dumps(sft[0]["tools"])
    # A bad column is one line naming the row and the field.
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}, {"prompt": "yo", "tools": "[{not json"}])
    with pytest.raises(DataError, match=r"^bad.jsonl: row 2: field 'tools': expected a list of tool schemas, or "
                                        r"that list as JSON text, got .*leave the column out$"):
        run_script("label.py", *args[:3], "bad.jsonl", *args[4:], "--generation_base_url", "http://127.0.0.1:9",
                   cwd=tmp_path)


TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                  "{% if think is defined %}THINK={{ think }}\n{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def test_a_local_generator_renders_tools_and_chat_template_kwargs(tiny_cache, tmp_path, monkeypatch):
    """--chat_template_kwargs (GRPOConfig's and vLLM's name) for every prompt, a row's own columns on top; both
    count in the response cache. A template that does not render the tools is refused before anything is
    generated (the model would answer without them)."""
    from alignkit.modeling import generation, presets

    rendered = []
    real = generation.render
    monkeypatch.setattr(generation, "render", lambda tok, m, t=None: rendered.append(real(tok, m, t)) or rendered[-1])
    write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "weather?", "tools": [WEATHER], "chat_template_kwargs": {"think": "row"}},
        {"prompt": "hello?"},
    ])
    (tmp_path / "tools.jinja").write_text(TOOLS_TEMPLATE)
    args = ["--mode", "completions", "--prompts", "prompts.jsonl", "--model_a", presets.paths()["model"],
            "--quantization", "none", "--num_threads", "1", "--max_new_tokens", "4", "--backend", "transformers",
            "--chat_template", "tools.jinja", "--output", "t.jsonl"]
    run_script("label.py", *args, "--chat_template_kwargs", '{"think": "all"}', cwd=tmp_path)
    by_prompt = {t.split("user: ")[1].split("\n")[0]: t for t in rendered}
    assert by_prompt["weather?"].startswith("TOOLS: get_weather") and "THINK=row" in by_prompt["weather?"]
    assert by_prompt["hello?"].startswith("THINK=all") and "TOOLS" not in by_prompt["hello?"]  # the row's own on top
    # The output rows say how each prompt was rendered, so dpo.py/sft.py render it the same way (TRL reads a row's
    # chat_template_kwargs; the answers were generated with --chat_template_kwargs, which the rows did not carry).
    out = {r["prompt"][0]["content"]: r for r in rows(tmp_path / "t.jsonl")}
    assert out["weather?"]["chat_template_kwargs"] == {"think": "row"} and out["weather?"]["tools"] == [WEATHER]
    assert out["hello?"]["chat_template_kwargs"] == {"think": "all"} and "tools" not in out["hello?"]
    from alignkit.core.data import load_sft

    assert load_sft(str(tmp_path / "t.jsonl"))["chat_template_kwargs"] == [{"think": "row"}, {"think": "all"}]
    # Read back as responses by a run with the same --chat_template_kwargs: both prompts pair with their answers.
    judged = run_script("label.py", "--prompts", "prompts.jsonl", "--responses_a", "t.jsonl", "--responses_b",
                        "t.jsonl", "--judge", "python:alignkit.modeling.presets:rule_judge", "--chat_template_kwargs",
                        '{"think": "all"}', "--output", "pairs.jsonl", cwd=tmp_path)
    assert all(r is not None for r in judged["responses"][0])
    rendered.clear()
    run_script("label.py", *args, "--chat_template_kwargs", '{"think": "other"}', cwd=tmp_path)
    assert len(rendered) == 2  # another --chat_template_kwargs: generated again, not taken from the cache
    (tmp_path / "plain.jinja").write_text(TOOLS_TEMPLATE.split("{% endif %}", 1)[1])
    with pytest.raises(UserError, match=r"^the chat template does not render tools, and a prompt \(.*weather\?"):
        run_script("label.py", *args[:-4], "--chat_template", "plain.jinja", "--output", "p.jsonl", cwd=tmp_path)


def test_vllm_gets_each_prompt_s_tools_and_template_arguments_in_one_call_per_set(tiny_cache, monkeypatch):
    """vLLM's LLM.chat takes one set of tools and chat_template_kwargs per call: prompts with other sets go in
    calls of their own, answers back in the prompts' order."""
    from fake_vllm import install
    from transformers import AutoTokenizer

    from alignkit.modeling import generation, presets

    fake = install(monkeypatch)
    from vllm import LLM

    engine = generation.VLLMGenerator.__new__(generation.VLLMGenerator)
    engine.llm, engine.lora, engine.chat_template_kwargs = LLM(), None, {"think": "all"}
    engine.tokenizer = AutoTokenizer.from_pretrained(presets.paths()["model"])
    engine.tokenizer.chat_template = engine.template = TOOLS_TEMPLATE
    asks = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    templates = [{"tools": [WEATHER]}, None, {"tools": [WEATHER]}, {"think": "row"}]
    assert engine(asks, templates=templates) == [f"vllm says: q{i}" for i in range(4)]
    calls = {json.dumps([c["tools"], c["chat_template_kwargs"]]): [m[-1]["content"] for m in c["messages"]]
             for c in fake.chats}
    assert calls == {json.dumps([[WEATHER], {"think": "all"}]): ["q0", "q2"], json.dumps([None, {"think": "all"}]): ["q1"],
                     json.dumps([None, {"think": "row"}]): ["q3"]}


def test_a_judge_that_fails_every_request_stops_early_and_an_empty_output_is_a_failed_run(tmp_path):
    """A server that is down: every request failed after its retries, the run wrote an empty file and ended with
    status 0 and 'train on it: python dpo.py ...'. The first 5 requests failing with none answered stop the run in
    one line naming --judge_base_url; fewer requests, all failed, end in one line too, and nothing done is lost."""
    prompts = marker_pairs(tmp_path, n=12)
    down = [True]

    def responder(body):
        return Fault(503) if down[0] else marker_judge(body)

    with FakeOpenAI(responder) as server:
        with pytest.raises(UserError, match=r"^the first 5 judge requests all failed \(InternalServerError: .*\): "
                                            r"stopped before the other \d+\. Check that the server at "
                                            r"--judge_base_url is up"):
            label(tmp_path, server, "--max_retries", "0", "--parallel", "1")
        assert 5 <= server.count <= 7  # not the 22 judgments (one or two may be under way as it stops)
        (tmp_path / "a.jsonl").write_text("".join(line + "\n" for line in (tmp_path / "a.jsonl").read_text()
                                                  .splitlines()[:2]))
        with pytest.raises(UserError, match=r"^no row was labeled: 4 judge requests failed \(see above\), so the "
                                            r"output is empty\. Check that the server"):
            label(tmp_path, server, "--max_retries", "0", "--parallel", "1")
        down[0] = False
        assert label(tmp_path, server, "--parallel", "1")["labeled"] == 2
    assert len(prompts) == 12
    # A server that goes down mid-run (an audit: asked every request left, the run ended with status 0 and "train on
    # it"): 20 failures in a row stop it in one line; a rerun asks only what is not done. A rate limit says so.
    prompts = marker_pairs(tmp_path, n=40, identical=False)
    answered, up = [], [True]

    def falls_over(body):
        if len(answered) >= 10 and not up[0]:
            return Fault(500)
        answered.append(1)
        return marker_judge(body)

    with FakeOpenAI(falls_over) as server:
        up[0] = False
        with pytest.raises(UserError, match=r"^the last 20 judge requests all failed, after 10 that succeeded, "
                                            r"\(InternalServerError: .*\): stopped before the other \d+\. Check that "
                                            r"the server at --judge_base_url is up"):
            label(tmp_path, server, "--max_retries", "0", "--parallel", "1", out="fell.jsonl")
        assert 30 <= server.count <= 31  # not the 80 judgments (one may be under way as it stops)
        up[0] = True
        summary = label(tmp_path, server, "--parallel", "1", out="fell.jsonl")
        assert summary["labeled"] == 40 and summary["judgments"]["from_cache"] == 10  # the 10 answered are kept
    # A request refused for itself (HTTP 400: a prompt too long for the judge) says nothing of the server: 25 of them
    # in a row stop nothing, and the run labels the rest (a review: they stopped it, and then every rerun).
    marker_pairs(tmp_path, n=40, identical=False)
    too_long = Fault(400, body='{"error": {"message": "context length exceeded", "type": "invalid_request_error"}}')

    def long_at_first(body):
        number = int(re.search(r"question (\d+)", body["messages"][-1]["content"]).group(1))
        return too_long if number < 25 else marker_judge(body)

    with FakeOpenAI(long_at_first) as server:
        summary = label(tmp_path, server, "--max_retries", "0", "--parallel", "1", out="long.jsonl")
        assert summary["judgments"]["failed"] == 50 and summary["labeled"] == 15
    with FakeOpenAI(lambda body: Fault(429)) as server:
        with pytest.raises(UserError, match=r"^the first 5 judge requests all failed \(RateLimitError: .*\): stopped "
                                            r"before the other \d+\. The server is limiting the rate of requests "
                                            r"\(HTTP 429\): lower --parallel"):
            label(tmp_path, server, "--max_retries", "0", "--parallel", "1", out="limited.jsonl")
    # A judge URL that serves a web page (status 200, no JSON): a failed request like any other (a traceback).
    marker_pairs(tmp_path, n=12)
    page = Fault(200, body="<html><body>Sign in</body></html>", headers={"Content-Type": "text/html"})
    with FakeOpenAI(lambda body: page) as server:
        with pytest.raises(UserError, match=r"^the first 5 judge requests all failed \(NotACompletion: .* answered "
                                            r"without a chat completion \(got '<html><body>Sign in</body></html>'\)"):
            label(tmp_path, server, "--max_retries", "0", "--parallel", "1", out="page.jsonl")
    # The same page said to be JSON: openai's bare JSONDecodeError ("Expecting value: line 1 column 1").
    page = Fault(200, body="<html>hello</html>", headers={"Content-Type": "application/json"})
    with FakeOpenAI(lambda body: page) as server:
        with pytest.raises(UserError, match=r"^the first 5 judge requests all failed \(NotACompletion: .* answered "
                                            r"without a chat completion \(a body that is not JSON: Expecting value"):
            label(tmp_path, server, "--max_retries", "0", "--parallel", "1", out="page.jsonl")
    # A generator that is down: the same, naming --generation_base_url (it asked every prompt, then wrote an empty
    # file with status 0 and pointed at dpo.py).
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {i} + {i}?"} for i in range(12)])

    def run(n):
        write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {i} + {i}?"} for i in range(n)])
        run_script("label.py", "--prompts", "prompts.jsonl", "--model_a", "openai:m", "--model_b", "openai:n",
                   "--generation_base_url", server.base_url, "--max_retries", "0", "--parallel", "1", "--judge",
                   "python:alignkit.modeling.presets:rule_judge", "--output", "gen.jsonl", cwd=tmp_path)

    with FakeOpenAI(lambda body: Fault(503)) as server:
        with pytest.raises(UserError, match=r"^the first 5 generation requests all failed \(InternalServerError: "
                                            r".*\): stopped before the other \d+\. Check that the server at "
                                            r"--generation_base_url is up \(the URL usually ends in /v1\), and openai:m"):
            run(12)
        with pytest.raises(UserError, match=r"^no row was labeled: 4 generation requests failed \(see above\), so the output "
                                            r"is empty\. Check that the server at --generation_base_url"):
            run(2)


def test_an_endpoint_that_accepts_and_never_answers_stops_the_run_at_its_first_timeout(tmp_path):
    """A judge or generator server that holds connections open and never answers (a proxy forwarding nowhere, a
    model still loading) had each request retried --max_retries times, --request_timeout each, before the first
    failure counted: about 12 minutes a request at the defaults, an hour at --parallel 1 before the run stopped. Until
    an endpoint has answered, its first timeout now stops the run in one line, and no request waits on it again."""
    marker_pairs(tmp_path, n=12)
    with SilentServer() as server:
        with pytest.raises(UserError, match=r"^--judge openai at http://127\.0\.0\.1:\d+/v1 accepted the connection but "
                                            r"sent no answer in 1 s \(--request_timeout\), and has answered no request "
                                            r"yet: check that its server is up"):
            label(tmp_path, server, "--request_timeout", "1", "--max_retries", "3", "--parallel", "2")
        assert server.connections <= 2  # the two requests under way: none retried, no other sent
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {i} + {i}?"} for i in range(6)])
    with SilentServer() as server:
        with pytest.raises(UserError, match=r"^generator openai:m at http://127\.0\.0\.1:\d+/v1 accepted the connection but sent "
                                            r"no answer in 1 s"):
            run_script("label.py", "--prompts", "prompts.jsonl", "--model_a", "openai:m", "--model_b", "openai:n",
                       "--generation_base_url", server.base_url, "--request_timeout", "1", "--parallel", "1",
                       "--judge", "python:alignkit.modeling.presets:rule_judge", "--output", "gen.jsonl", cwd=tmp_path)
        assert server.connections == 1


def test_the_watched_client_still_goes_through_the_proxy_the_environment_names(monkeypatch):
    """The silent-endpoint watch first replaced httpx's transport, which makes httpx ignore HTTP(S)_PROXY: behind a
    corporate proxy every request would fail. The proxy the environment names still carries the request."""
    from alignkit.core.llm import ChatClient

    with FakeOpenAI(lambda body: "via the proxy") as proxy:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.base_url.removesuffix("/v1"))
        client = ChatClient("m", "http://judge.invalid/v1", timeout=5, max_retries=0)
        assert client.complete([{"role": "user", "content": "hi"}]) == "via the proxy" and proxy.count == 1


def test_a_python_judge_that_breaks_its_contract_is_named_in_one_line(tmp_path, alignkit_log):
    """A rule returning None (or 'maybe') was a 'parse failure' with no word of what it returned; lowercase verdicts
    were parse failures too. What it returned is named once (a rule may abstain: still a parse failure); 'a'/'b'
    are verdicts."""
    marker_pairs(tmp_path)
    (tmp_path / "rules.py").write_text(
        "def nothing(prompt, a, b):\n    return None\n\n"
        "def lower(prompt, a, b):\n    return 'a' if 'MARKER' in a else 'b' if 'MARKER' in b else 'tie'\n\n"
        "def unsure(prompt, a, b):\n    return 'maybe'\n")

    def run(rule):
        try:
            run_script("label.py", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge",
                       f"python:rules.py:{rule}", "--output", f"{rule}.jsonl", cwd=tmp_path)
        except UserError as error:  # not one verdict: a failed run, its summary written
            assert str(error).startswith("no pair was labeled: the judge gave no verdict in any of its 10 answers ("
                                         f"they are in {rule}.cache/judgments.jsonl): a python: judge returns A, B or "
                                         f"tie; fix python:rules.py:{rule}, then run again"), error
            assert "--retry_parse_failures" not in str(error)  # its answers key on its code: a fixed rule judges anew
        return json.loads((tmp_path / f"{rule}.summary.json").read_text())

    assert run("nothing")["parse_failures"] == 5
    assert alignkit_log.text.count("python:rules.py:nothing: returned None, which holds no verdict") == 1
    assert run("lower")["labeled"] == 5
    assert run("unsure")["parse_failures"] == 5  # every pair
    assert alignkit_log.text.count("python:rules.py:unsure: returned 'maybe', which holds no verdict") == 1


def test_a_notebook_s_label_cells_take_only_what_this_run_made(tmp_path, monkeypatch):
    """label.ipynb's settings cell run again (--max_prompts 1), then only the output cell: the earlier prompts,
    responses and pairs were written under the new settings, with a summary saying 0 pairs beside 2 rows (an
    audit found it). Each step now takes only what this run's own steps made, and says which cells to run."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings
    from alignkit.feedback.label_pairs import judge_pairs, make_pairs
    from alignkit.feedback.label_records import write_output
    from alignkit.feedback.labeling import collect_responses, load_prompts, prepare

    monkeypatch.chdir(tmp_path)
    prompts_text = ["name three fruits.", "name three tools."]
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "response": "apple, pear, plum"} for p in prompts_text])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": p, "response": "no"} for p in prompts_text])

    def settings_cell(*extra):
        s = parse_config(LabelSettings, env_file=None, args=[
            "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge",
            "python:alignkit.modeling.presets:rule_judge", "--output", "p.jsonl", *extra])
        return prepare(s)

    run = settings_cell()
    prompts = load_prompts(run)
    responses = collect_responses(run, prompts)
    pairs = make_pairs(run, prompts, responses)
    judge_pairs(run, pairs)
    assert write_output(run, prompts, responses, pairs)["pairs"] == 2
    run.close()

    run = settings_cell("--max_prompts", "1")
    with pytest.raises(UserError, match=r"^the prompts were not made by this run's 'Prompts' cell .*run the cells "
                                        r"from 'Prompts' on again \(Prompts, Responses, Judge, Output\)$"):
        write_output(run, prompts, responses, pairs)
    with pytest.raises(UserError, match="the prompts were not made"):
        collect_responses(run, prompts)
    prompts = load_prompts(run)  # the Prompts cell alone
    with pytest.raises(UserError, match=r"^the responses were not made by this run's 'Responses' cell .*from "
                                        r"'Responses' on again \(Responses, Judge, Output\)$"):
        make_pairs(run, prompts, responses)
    responses = collect_responses(run, prompts)
    with pytest.raises(UserError, match=r"^the pairs were not made by this run's 'Judge' cell .*\(Judge, Output\)$"):
        judge_pairs(run, pairs)
    pairs = make_pairs(run, prompts, responses)
    judge_pairs(run, pairs)
    summary = write_output(run, prompts, responses, pairs)
    run.close()
    assert summary["pairs"] == 1 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 1


def test_an_output_replaced_by_one_of_another_size_is_said(tmp_path, alignkit_log):
    """label.py run again with another --max_prompts replaced 320 rows by 86 without a word."""
    from alignkit.feedback.label_records import replace_output

    path = tmp_path / "preferences.jsonl"
    replace_output(path, [{"a": 1}] * 3)
    assert "replaced" not in alignkit_log.text  # a new file
    replace_output(path, [{"a": 1}] * 3)
    assert "replaced" not in alignkit_log.text  # the same rows again
    replace_output(path, [{"a": 1}])
    assert f"replaced {path}: 3 rows before, 1 now" in alignkit_log.text
    assert path.read_text().count("\n") == 1


def test_a_prompt_ending_with_an_answer_is_said_to_lose_it(tmp_path, alignkit_log):
    """rl.py (as TRL would not: it continues a final assistant turn) and label.py answer the turn before it: said
    in one line, not silently."""
    from alignkit.feedback.labeling import read_prompts

    path = tmp_path / "prompts.jsonl"
    conversation = [{"role": "user", "content": "name three fruits."}, {"role": "assistant", "content": "apple,"}]
    path.write_text(json.dumps({"prompt": conversation}) + "\n" + json.dumps({"prompt": "name three tools."}) + "\n")
    prompts = read_prompts(str(path), keep_rows=True)
    assert [p.messages[-1]["role"] for p in prompts] == ["user", "user"]
    assert "1 prompts end with an assistant turn: the model answers the turn before it anew" in alignkit_log.text


def test_the_closing_command_goes_on_where_the_preset_s_own_run_reads_the_labels(tmp_path, monkeypatch):
    """label.py --preset smol ended with `python dpo.py --preset smol --dataset_id runs/label-smol/preferences.jsonl
    --run_name smol-dpo-on-preferences`: a folder the README's next commands (evaluate.py pairwise, merge.py
    --preset smol, which read runs/smol-dpo) never read (the README audit of session 32). Where the preset's own run
    reads the labels, its command is the preset's alone; elsewhere a run folder of its own, as before."""
    from alignkit.feedback.label_records import train_command

    monkeypatch.chdir(tmp_path)
    assert train_command("dpo.py", "smol", "runs/label-smol/preferences.jsonl") == "python dpo.py --preset smol"
    assert train_command("dpo.py", "smol", "mine.jsonl") == \
        "python dpo.py --preset smol --dataset_id mine.jsonl --run_name smol-dpo-on-mine"
    assert train_command("kto.py", None, "l.jsonl", " --desirable_weight 2.0") == \
        "python kto.py --dataset_id l.jsonl --desirable_weight 2.0"
    # In a notebook a command works nowhere (dpo.py is in the repository's root, the path relative to the kernel's
    # folder): the dpo notebook's overrides instead, which resolve the path as this notebook does (the notebook audit).
    from alignkit.feedback import label_records

    monkeypatch.setattr(label_records, "is_notebook", lambda: True)
    assert train_command("dpo.py", "tiny", "runs/label-tiny/preferences.jsonl") == \
        'dpo.ipynb with overrides = {"preset": "tiny", "dataset_id": "runs/label-tiny/preferences.jsonl", ' \
        '"run_name": "tiny-dpo-on-preferences"}'
    assert train_command("dpo.py", "smol", "runs/label-smol/preferences.jsonl") == \
        'dpo.ipynb with overrides = {"preset": "smol"}'
    assert train_command("kto.py", "tiny", "runs/label-tiny/labels.jsonl", " --desirable_weight 5.6") == \
        'kto.ipynb with overrides = {"preset": "tiny", "dataset_id": "runs/label-tiny/labels.jsonl", "run_name": ' \
        '"tiny-kto-on-labels", "desirable_weight": 5.6}'
