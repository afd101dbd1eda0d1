"""evaluate.py: vibes, MT-Bench pairwise judging through FastChat, the tiny preset's pairwise check.

Offline: the judge is a real HTTP server on 127.0.0.1 (tests/openai_server.py) reached by the real `openai`
client; the questions are real MT-Bench ones from ../shared/data/fastchat-llm-judge; the models are the tiny
preset's. Judge tests write the two models' answers first (a resumed run does not generate them again), so
the judge can tell them apart; generation is tested on its own with the tiny models.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import threading
import time
import types
from pathlib import Path

import pytest

from conftest import SHARED, run_script
from openai_server import FakeOpenAI, Fault, SilentServer

from alignkit.core.args import ConfigError
from alignkit.core.errors import UserError
from alignkit.evals import fastchat_compat, judgments, mtbench, prompts_file, results
from alignkit.evals.named_models import parse_models
from alignkit.modeling import presets

MT_DATA = SHARED / "data" / "fastchat-llm-judge"
QIDS = ["81", "101", "111", "131"]  # writing, reasoning (reference), math (reference), extraction


@pytest.fixture(scope="module")
def mt_data():
    if not (MT_DATA / mtbench.QUESTIONS).is_file():
        pytest.skip(f"MT-Bench data not found at {MT_DATA} (FastChat's fastchat/llm_judge/data layout)")
    return MT_DATA


@pytest.fixture(autouse=True)
def no_judge_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def write_answers(output_dir: Path, name: str, qids, marker: str) -> None:
    """FastChat answer records whose every turn carries `marker`, so a judge can tell the models apart."""
    path = mtbench.answer_path(output_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for qid in qids:
            turns = [f"{marker} answer {i} to question {qid}" for i in (1, 2)]
            f.write(json.dumps({"question_id": int(qid), "answer_id": f"{name}-{qid}", "model_id": name,
                                "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}) + "\n")


def prefers(marker: str, other: str):
    """A judge picking whichever of A and B carries `marker` (A's answer comes first in FastChat's prompts)."""
    def respond(body):
        prompt = body["messages"][-1]["content"]
        return "[[A]]" if prompt.index(marker) < prompt.index(other) else "[[B]]"
    return respond


def mt_bench(server, output_dir, *extra):
    return run_script(
        "evaluate.py", "mt_bench", "--models", "alpha=/nowhere/alpha", "omega=/nowhere/omega", "--baseline", "omega",
        "--judge_model", "judge-x", "--judge_base_url", server.base_url, "--mt_bench_data", str(MT_DATA),
        "--question_ids", *QIDS, "--output_dir", str(output_dir), "--max_retries", "0", "--bootstrap_rounds", "200",
        *extra,
    )


def overall(run, model="alpha"):
    (pair,) = [p for p in run["pairs"] if p["model"] == model]
    return pair["overall"]


# ---------------------------------------------------------------------------------------------------------
# The FastChat adaptation


def test_fastchat_names_that_the_adaptation_relies_on_are_unchanged():
    import fastchat

    assert fastchat.__version__ == fastchat_compat.FASTCHAT_VERSION
    fastchat_compat.check()  # raises FastChatChanged naming whatever moved
    common, gen_judgment = fastchat_compat.load()
    # The four adapted points, spelled out (see the module docstring).
    assert "gpt-4" in common.OPENAI_MODEL_LIST and "judge-x" not in common.OPENAI_MODEL_LIST
    assert common.API_ERROR_OUTPUT == "$ERROR$"
    assert set(common.NEED_REF_CATS) >= {"math", "reasoning", "coding"}
    if MT_DATA.is_dir():  # evaluate.py picks FastChat's judges by these keys
        judges = fastchat_compat.judges("judge-x", mtbench.load_judge_prompts(MT_DATA / mtbench.JUDGE_PROMPTS))
        assert {k: (j.model_name, j.prompt_template["name"], j.ref_based, j.multi_turn) for k, j in judges.items()} == {
            "default": ("judge-x", "pair-v2", False, False), "math": ("judge-x", "pair-math-v1", True, False),
            "default-mt": ("judge-x", "pair-v2-multi-turn", False, True),
            "math-mt": ("judge-x", "pair-math-v1-multi-turn", True, True),
        }
    import sys

    # FastChat's module keeps its placeholder for `anthropic`; nothing else ever sees it.
    assert "placeholder" not in (getattr(sys.modules.get("anthropic"), "__doc__", "") or "")


def test_drift_in_an_adapted_fastchat_name_is_reported():
    common, gen_judgment = fastchat_compat.load()
    renamed = types.SimpleNamespace(**{k: getattr(common, k) for k in dir(common) if not k.startswith("__")})
    del renamed.chat_completion_openai  # e.g. a release that renames it
    with pytest.raises(fastchat_compat.FastChatChanged, match=r"common\.chat_completion_openai is missing"):
        fastchat_compat.check(renamed, gen_judgment)

    def make_match(questions, models, model_answers, judge, baseline_model, ref_answers=None):  # lost multi_turn
        return ref_answers[judge.model_name]

    changed = types.SimpleNamespace(**{k: getattr(gen_judgment, k) for k in dir(gen_judgment) if k[:2] != "__"})
    changed.make_match = make_match
    with pytest.raises(fastchat_compat.FastChatChanged, match="make_match.*no longer takes"):
        fastchat_compat.check(common, changed)


# ---------------------------------------------------------------------------------------------------------
# MT-Bench data


def test_pinned_checksums_match_the_shared_data_and_catch_a_changed_file(mt_data, tmp_path):
    assert mtbench.checksum_mismatches(mt_data) == []
    sums = dict(reversed(line.split()) for line in (mt_data / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert sums == mtbench.CHECKSUMS
    copy = tmp_path / "data"
    shutil.copytree(mt_data, copy)
    with open(copy / mtbench.QUESTIONS, "a") as f:
        f.write("\n")
    assert mtbench.checksum_mismatches(copy) == [mtbench.QUESTIONS]
    (copy / mtbench.REFERENCES).unlink()
    with pytest.raises(ConfigError, match="lacks mt_bench/reference_answer/gpt-4.jsonl"):
        mtbench.data_dir(str(copy))


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_checks_checksums_and_fails_fast_without_network(mt_data, tmp_path, monkeypatch):
    # Offline (HF_HUB_OFFLINE, set by conftest): a clear error at once, naming the way out.
    with pytest.raises(ConfigError, match="--mt_bench_data"):
        mtbench.data_dir(None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ALIGNKIT_OFFLINE", raising=False)
    # A network that refuses the connection: an error within seconds, not a hang.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(mtbench, "BASE_URL", f"http://127.0.0.1:{closed}/")
    start = time.time()
    with pytest.raises(ConfigError, match="could not download .*Without network.*--mt_bench_data"):
        mtbench.download(tmp_path / "cache")
    assert time.time() - start < 10
    # A server with FastChat's files: downloaded and checked; one with a changed file: refused, nothing saved.
    for served, ok in [(mt_data, True), (tmp_path / "changed", False)]:
        if not ok:
            shutil.copytree(mt_data, served)
            (served / mtbench.JUDGE_PROMPTS).write_text("{}\n")
        handler = lambda *a, d=str(served), **k: _Files(*a, directory=d, **k)  # noqa: E731
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        monkeypatch.setattr(mtbench, "BASE_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
        target = tmp_path / f"cache-{ok}"
        try:
            if ok:
                assert mtbench.download(target) == target and mtbench.checksum_mismatches(target) == []
            else:
                with pytest.raises(ConfigError, match="judge_prompts.jsonl does not match its pinned checksum"):
                    mtbench.download(target)
                assert not (target / mtbench.JUDGE_PROMPTS).exists()
        finally:
            httpd.shutdown()
            httpd.server_close()


def test_bad_data_and_flags_give_errors_naming_file_row_and_field(mt_data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(mt_data, copy)
    lines = (copy / mtbench.QUESTIONS).read_text().splitlines()
    row = json.loads(lines[2])
    row["turns"] = "one string"
    lines[2] = json.dumps(row)
    (copy / mtbench.QUESTIONS).write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"question\.jsonl, line 3: field 'turns' must be a non-empty list"):
        mtbench.load_questions(copy / mtbench.QUESTIONS)
    with pytest.raises(ConfigError, match="--question_ids 7 not in"):
        mtbench.load_questions(mt_data / mtbench.QUESTIONS, [81, 7])
    with pytest.raises(ConfigError, match="NAME=ID_OR_PATH"):
        parse_models(["bad name=x"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_models(["a=x", "a=y"])
    with pytest.raises(ConfigError, match="--baseline zeta is not one of"):
        run_script("evaluate.py", "mt_bench", "--models", "a=x", "b=y", "--baseline", "zeta", "--judge_model", "j",
                   "--judge_base_url", "http://127.0.0.1:9/v1", "--output_dir", str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="--judge_model"):
        run_script("evaluate.py", "mt_bench", "--models", "a=x", "b=y")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(ConfigError, match=r"prompts\.jsonl, line 2: no field 'prompt'; its fields: text"):
        prompts_file.prompt_questions(prompts)


def test_help_for_each_command_and_a_missing_command(capsys):
    for command, flag in [("vibes", "--compare_to"), ("mt_bench", "--mt_bench_data"), ("pairwise", "--prompts_file")]:
        with pytest.raises(SystemExit) as exit_:
            run_script("evaluate.py", command, "--help")
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"evaluate.py {command}" in out and flag in out and "--temperature" in out
    assert "--model_id" not in out  # pairwise/mt_bench take --models; the loader flags still apply
    with pytest.raises(ConfigError, match=r"^missing command: evaluate.py takes one of vibes, mt_bench, pairwise, "
                                          r"alpaca_eval, lm_eval first \(python evaluate.py --help says what each "
                                          r"does\)$"):  # one line (the usage block followed it)
        run_script("evaluate.py")
    with pytest.raises(ConfigError, match=r"unknown command 'mtbench' \(did you mean mt_bench\?\)"):
        run_script("evaluate.py", "mtbench")


# ---------------------------------------------------------------------------------------------------------
# Judging through FastChat with a real HTTP judge


def test_a_judge_preferring_one_model_gives_it_a_win_rate_near_one(mt_data, tmp_path):
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    with FakeOpenAI(prefers("ALPHA", "OMEGA")) as server:
        run = mt_bench(server, tmp_path, "--parallel", "4")
        assert server.count == 16  # 4 questions x 2 turns x both orders
        requests = list(server.requests)
        again = mt_bench(server, tmp_path)
        assert server.count == 16  # judged matches are not sent again
    stats = overall(run)
    assert (stats["win"], stats["loss"], stats["tie"], stats["error"]) == (8, 0, 0, 0)
    assert stats["adjusted_win_rate"] == 1.0 and stats["ci95"] == [1.0, 1.0]
    assert set(run["pairs"][0]["by_category"]) == {"writing", "reasoning", "math", "extraction"}
    assert overall(again) == stats
    # FastChat's prompts: its system prompt, the multi-turn prompt for turn 2, the GPT-4 reference for math.
    assert all(r["model"] == "judge-x" and r["temperature"] == 0 and r["max_tokens"] == 2048
               and r["messages"][0]["role"] == "system" for r in requests)
    reference = mtbench.load_reference_answers(mt_data / mtbench.REFERENCES)[111]["choices"][0]["turns"][0]
    math = [r for r in requests if "circumscribing" in r["messages"][-1]["content"] or
            "vertices of a triangle" in r["messages"][-1]["content"]]
    assert len(math) == 4 and all(reference in r["messages"][-1]["content"] for r in math)
    multi_turn = "<|The Start of Assistant A's Conversation with User|>"
    assert sum(multi_turn in r["messages"][-1]["content"] for r in requests) == 8
    # FastChat's judgment format, and the outputs.
    records = [json.loads(line) for line in judgments.judgment_path(tmp_path, "judge-x").read_text().splitlines()]
    assert {tuple(r["judge"]) for r in records} == {("judge-x", p) for p in mtbench.PAIR_PROMPTS}
    assert {(r["g1_winner"], r["g2_winner"]) for r in records} == {("model_1", "model_1")}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["pairs"][0]["overall"]["adjusted_win_rate"] == 1.0
    assert saved["judge_usage"]["calls"] == 0  # the rerun's usage: it sent nothing
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_always_A_judge_gives_all_ties(mt_data, tmp_path, capsys):
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    with FakeOpenAI(lambda body: "Assistant A is better. [[A]]") as server:
        run = mt_bench(server, tmp_path, "--mode", "pairwise-all")
    stats = overall(run)
    assert (stats["win"], stats["loss"], stats["tie"], stats["error"]) == (0, 0, 8, 0)
    assert stats["adjusted_win_rate"] == 0.5 and stats["win_rate"] == 0.0
    out = capsys.readouterr().out
    assert "alpha vs omega" in out
    # Nor FastChat's line per match judged ("question: 81, turn: 1, model_1: alpha, ..., g1_winner: ..."): 160 a
    # model pair on full MT-Bench, over alignkit's bar and table (the evaluate audit of session 112).
    assert "g1_winner" not in out and "question: " not in out


def test_pairwise_all_reports_each_model_over_all_its_matches_as_fastchat_does(mt_data, tmp_path, capsys,
                                                                                 monkeypatch):
    """In pairwise-all only per-pair numbers from model_1's side were reported: the model listed last never got a
    row, and FastChat's show_result totals each model over every match it played."""
    import argparse

    from fastchat.llm_judge import show_result

    for name, marker in (("alpha", "ALPHA"), ("beta", "BETA"), ("omega", "OMEGA")):
        write_answers(tmp_path, name, QIDS, marker)
    rank = {"ALPHA": 0, "BETA": 1, "OMEGA": 2}

    def judge(body):  # alpha > beta > omega, but beta and omega tie on question 81 (a trip to Hawaii)
        prompt = body["messages"][-1]["content"]
        shown = sorted((prompt.index(m), m) for m in rank if m in prompt)
        (_, a), (_, b) = shown[:2]
        if {a, b} == {"BETA", "OMEGA"} and "Hawaii" in prompt:
            return "[[C]]"
        return "[[A]]" if rank[a] < rank[b] else "[[B]]"

    with FakeOpenAI(judge) as server:
        run = run_script(
            "evaluate.py", "mt_bench", "--models", "alpha=/nowhere/alpha", "beta=/nowhere/beta", "omega=/nowhere/omega",
            "--mode", "pairwise-all", "--judge_model", "judge-x", "--judge_base_url", server.base_url,
            "--mt_bench_data", str(MT_DATA), "--question_ids", *QIDS, "--output_dir", str(tmp_path),
            "--max_retries", "0", "--bootstrap_rounds", "50")
    printed = []
    monkeypatch.setattr(show_result, "print", lambda *a: printed.extend(a), raising=False)
    show_result.display_result_pairwise(argparse.Namespace(
        input_file=str(judgments.judgment_path(tmp_path, "judge-x")), model_list=None, baseline_model=None))
    fastchat = printed[-1]
    saved = json.loads((tmp_path / "results.json").read_text())["model_totals"]
    assert [t["model"] for t in saved] == ["alpha", "beta", "omega"] and saved[1]["tie"] == saved[2]["tie"] == 2
    for t in saved:
        row = fastchat.loc[t["model"]]
        assert (t["win"], t["loss"], t["tie"]) == (row["win"], row["loss"], row["tie"])
        assert t["adjusted_win_rate"] == pytest.approx(row["win_rate_adjusted"])
    assert "FastChat's pairwise-all table" in capsys.readouterr().out and run["pairs"]


def test_judge_errors_are_counted_as_errors_never_ties_and_retried_on_rerun(mt_data, tmp_path, monkeypatch):
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    good, healthy = prefers("ALPHA", "OMEGA"), [False]

    def flaky(body):  # requests about question 81 fail, about 131 time out; one verdict cannot be parsed
        prompt = body["messages"][-1]["content"]
        if healthy[0]:
            return good(body)
        if "travel blog" in prompt:
            return Fault(status=500)
        if "movie reviews" in prompt:
            return Fault(status=200, delay=8.0)
        if "overtaken" in prompt and "Conversation" not in prompt:
            return "I cannot decide."
        return good(body)

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret-0123456789")
    with FakeOpenAI(flaky) as server:
        run = mt_bench(server, tmp_path, "--judge_api_key_env", "MY_JUDGE_KEY", "--request_timeout", "2",
                       "--parallel", "8")
        stats = overall(run)
        assert (stats["win"], stats["tie"], stats["error"], stats["n"]) == (3, 0, 5, 3)
        by_category = run["pairs"][0]["by_category"]
        assert by_category["writing"]["error"] == by_category["extraction"]["error"] == 2
        assert len(run["failures"]) == 8
        healthy[0], before = True, server.count
        rerun = mt_bench(server, tmp_path, "--judge_api_key_env", "MY_JUDGE_KEY")
        assert server.count - before == 8  # only the matches of failed requests (questions 81, 131) are sent again
        assert (overall(rerun)["win"], overall(rerun)["error"]) == (7, 1)  # the unparsable verdict stays an error
    for file in tmp_path.rglob("*"):
        assert file.is_dir() or b"sk-test-secret" not in file.read_bytes(), file


def test_a_judge_that_fails_every_request_is_a_failed_run_not_a_table_of_errors(mt_data, tmp_path):
    """Every request failing (a server that is down) printed a table of errors and ended with status 0; and it was
    asked every request (with --max_retries each) before saying so: the first 5 failing now stop the run."""
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    with FakeOpenAI(lambda body: Fault(status=503)) as server:
        with pytest.raises(UserError, match=r"^the first 5 judge requests all failed \(InternalServerError: .*\): "
                                            r"stopped before the other 11\. Check that the server at --judge_base_url "
                                            r"is up .* then run the same command again"):
            mt_bench(server, tmp_path)
        assert server.count == 5 and not (tmp_path / "results.json").exists()
        judged = judgments.read_judgments(judgments.judgment_path(tmp_path, "judge-x"))
        assert len(judged) == 2  # the matches played before the stop are kept (their failed requests retry)
        with pytest.raises(UserError, match=r"^all 4 judge requests failed \(InternalServerError: .*\)\. Check that "
                                            r"the server at --judge_base_url is up"):
            judge_one_question(server, tmp_path)  # fewer requests than the first-failures stop: all fail
        assert not (tmp_path / "results.json").exists()


def judge_one_question(server, folder):
    """evaluate.py mt_bench on question 81 alone (4 judge requests), answers already in `folder`, no retries."""
    run_script("evaluate.py", "mt_bench", "--models", "alpha=/nowhere/alpha", "omega=/nowhere/omega", "--baseline",
               "omega", "--judge_model", "judge-x", "--judge_base_url", server.base_url, "--mt_bench_data",
               str(MT_DATA), "--question_ids", "81", "--output_dir", str(folder), "--max_retries", "0")


def test_all_judge_requests_failed_names_rlaif_s_command_in_a_round(mt_data, tmp_path, monkeypatch):
    """evaluate.py as a round's step: "all N judge requests failed ... then run the same command again" named the
    step's own command (it ends in --resume false); it names how to go on where rlaif runs (STEP_AGAIN)."""
    from alignkit.core import errors

    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    monkeypatch.setenv(errors.STEP_AGAIN, "run the same rlaif.py command again")
    with FakeOpenAI(lambda body: Fault(status=503)) as server:
        with pytest.raises(UserError, match=r"^all 4 judge requests failed \(InternalServerError: .*\)\. .*, then "
                                            r"run the same rlaif\.py command again \(the answers are kept\)$"):
            judge_one_question(server, tmp_path)  # fewer requests than the first-failures stop: all fail


def test_a_judge_that_never_answers_stops_mt_bench_at_its_first_timeout(mt_data, tmp_path, alignkit_log):
    """A judge server holding connections open without answering was retried --max_retries times per request, at
    --request_timeout each, before a failure counted: its first timeout now stops the run in one line."""
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    with SilentServer() as server:
        with pytest.raises(UserError, match=r"^the judge at http://127\.0\.0\.1:\d+/v1 accepted the connection but "
                                            r"sent no answer in 1 s \(--request_timeout\)"):
            mt_bench(server, tmp_path, "--request_timeout", "1", "--max_retries", "4", "--parallel", "2")
        assert server.connections <= 2 and not (tmp_path / "results.json").exists()
    assert "failed after" not in alignkit_log.text  # no retry happened, and its line is the error itself


def test_a_judge_whose_verdicts_never_parse_is_a_failed_run_with_an_example(mt_data, tmp_path, capsys):
    """A judge that never writes [[A]]/[[B]]/[[C]] gave a table of errors without saying what it wrote; one that
    sometimes does not is counted, with an example."""
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    good, vague = prefers("ALPHA", "OMEGA"), [True]

    def judge(body):
        prompt = body["messages"][-1]["content"]
        return "Both answers are fine; I prefer neither." if vague[0] or "travel blog" in prompt else good(body)

    with FakeOpenAI(judge) as server:
        with pytest.raises(UserError, match=r"^the judge gave no verdict FastChat can parse in any of its 16 answers "
                                            r"\(the last ended 'Both answers are fine; I prefer neither\.'\): use a "
                                            r"judge model .* rerun with --retry_parse_failures true"):
            mt_bench(server, tmp_path)
        vague[0] = False
        capsys.readouterr()
        run = mt_bench(server, tmp_path, "--retry_parse_failures", "true")
        assert overall(run)["error"] == 2 and overall(run)["win"] == 6
        assert ("4 of 16 judge answers had no verdict FastChat can parse (counted as errors), e.g. one ending 'Both "
                "answers are fine; I prefer neither.'") in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (("pair-v2", "prompt_template", "[Question]\n{question}\n{answer_a} {answer_b} {reference}"),
     r"line 1 \(pair-v2\): field 'prompt_template' has the placeholder\(s\) reference, which FastChat does not "
     r"fill; it fills answer_a, answer_b, question"),
    (("pair-math-v1", "prompt_template", "{question} {answer_a} {answer_b} {ref_answer_1} {json: 1}"),
     r"\(pair-math-v1\): field 'prompt_template' has the placeholder\(s\) json"),
    (("pair-v2-multi-turn", "prompt_template", "{question_1} a lone } brace"),
     r"\(pair-v2-multi-turn\): field 'prompt_template' is not a format string FastChat can fill .*write a literal "
     r"brace as {{ or }}"),
    (("pair-v2", "output_format", "[[1]]"),
     r"\(pair-v2\): field 'output_format' is '\[\[1\]\]'; FastChat parses a pairwise verdict only as"),
], ids=["unknown-placeholder", "json-braces", "lone-brace", "output-format"])
def test_judge_prompt_templates_are_checked_before_any_model_answers(mt_data, tmp_path, change, message):
    """A placeholder FastChat does not fill (or a lone brace) was a KeyError traceback at the first match, after
    every model had answered every question."""
    data = tmp_path / "data"
    shutil.copytree(MT_DATA, data)
    name, field, value = change
    rows = [json.loads(line) for line in (data / mtbench.JUDGE_PROMPTS).read_text().splitlines()]
    for row in rows:
        if row["name"] == name:
            row[field] = value
    (data / mtbench.JUDGE_PROMPTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=message):
        run_script("evaluate.py", "mt_bench", "--models", "alpha=/nowhere/alpha", "omega=/nowhere/omega",
                   "--judge_model", "judge-x", "--judge_base_url", "http://127.0.0.1:9/v1", "--mt_bench_data",
                   str(data), "--question_ids", *QIDS, "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model_answer").exists()


def test_judgments_key_on_the_endpoint_and_max_tokens_and_parse_failures_retry_on_request(mt_data, tmp_path):
    """Verdicts cut off by a small --judge_max_tokens stay recorded under it; a rerun with room to answer, or
    against another server behind the same judge model name, judges again; --retry_parse_failures asks again
    under the same settings."""
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    good, decided = prefers("ALPHA", "OMEGA"), [True]

    def cut_short(body):  # no verdict when the answer is cut off, or while the judge cannot decide
        return good(body) if body["max_tokens"] >= 100 and decided[0] else "Assistant A's answer is more"

    with FakeOpenAI(cut_short) as server, FakeOpenAI(good) as other:
        no_verdict = r"^the judge gave no verdict FastChat can parse in any of its 16 answers .*--judge_max_tokens"
        with pytest.raises(UserError, match=no_verdict):  # every answer cut off: no table of errors
            mt_bench(server, tmp_path, "--judge_max_tokens", "20")
        assert server.count == 16
        with pytest.raises(UserError, match=no_verdict):
            mt_bench(server, tmp_path, "--judge_max_tokens", "20")
        assert server.count == 16  # the paid answers are kept under the same settings
        full = mt_bench(server, tmp_path)  # FastChat's 2048: judged again
        assert server.count == 32 and {r["max_tokens"] for r in server.requests[16:]} == {2048}
        assert (overall(full)["win"], overall(full)["error"]) == (8, 0)
        moved = mt_bench(other, tmp_path)  # the same model name at another endpoint is another judge
        assert other.count == 16 and overall(moved)["win"] == 8 and server.count == 32
        mt_bench(server, tmp_path)  # each judge's verdicts are still there when it comes back
        assert server.count == 32

        decided[0] = False
        with pytest.raises(UserError, match=no_verdict):
            mt_bench(server, tmp_path, "--judge_max_tokens", "100")
        assert server.count == 48
        decided[0] = True
        with pytest.raises(UserError, match=no_verdict):
            mt_bench(server, tmp_path, "--judge_max_tokens", "100")
        assert server.count == 48  # unparsable, but paid for: not asked again without being told
        retried = mt_bench(server, tmp_path, "--judge_max_tokens", "100", "--retry_parse_failures")
        assert server.count == 64 and (overall(retried)["win"], overall(retried)["error"]) == (8, 0)


def test_the_judgment_file_fastchat_reads_holds_one_verdict_a_match(mt_data, tmp_path, capsys):
    """A rerun under another judge endpoint appended its verdicts beside the earlier ones: alignkit reported the new
    verdicts, while FastChat's show_result on the same file counted both (a 0.5 win rate where alignkit said 0).
    The replaced verdicts move to <judge>_pair.replaced.jsonl, where a judge that comes back still finds them."""
    write_answers(tmp_path, "alpha", QIDS, "ALPHA")
    write_answers(tmp_path, "omega", QIDS, "OMEGA")
    path = judgments.judgment_path(tmp_path, "judge-x")
    archive = judgments.archive_path(path)

    def fastchat_win_rate(file):  # FastChat's show_result --mode pairwise-baseline: every row of the file counts
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        wins = sum(r["g1_winner"] == r["g2_winner"] == "model_1" for r in rows)
        losses = sum(r["g1_winner"] == r["g2_winner"] == "model_2" for r in rows)
        return len(rows), (wins + 0.5 * (len(rows) - wins - losses)) / len(rows)

    with FakeOpenAI(prefers("ALPHA", "OMEGA")) as first, FakeOpenAI(prefers("OMEGA", "ALPHA")) as second:
        mt_bench(first, tmp_path)
        capsys.readouterr()
        run = mt_bench(second, tmp_path)
        assert overall(run)["adjusted_win_rate"] == 0.0 and fastchat_win_rate(path) == (8, 0.0)
        assert len(archive.read_text().splitlines()) == 8  # the first judge's verdicts, kept
        assert f"8 earlier verdicts of matches judged again moved to {archive}\n" in capsys.readouterr().out
        back = mt_bench(first, tmp_path)
        assert first.count == 16 and overall(back)["adjusted_win_rate"] == 1.0  # reused, not paid again
        # Said as it happened: nothing was judged again (the evaluate.py audit of session 98: "8 earlier verdicts of
        # matches judged again moved" after "8 judged before, 0 to judge").
        said = capsys.readouterr().out
        assert "judged again" not in said and f"8 verdicts made before under these judge settings taken back from " \
            f"{archive}; the 8 they replace (other settings or answers) moved there\n" in said
        assert fastchat_win_rate(path) == (8, 1.0) and len(archive.read_text().splitlines()) == 16


def test_pairwise_on_own_prompts_with_an_llm_judge(mt_data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Write a haiku about rain.", "category": "writing"},
        {"prompt": "What is 7 * 8?", "category": "math"}, {"prompt": "name three fruits."}]))
    write_answers(tmp_path, "alpha", ["1", "2", "3"], "ALPHA")
    write_answers(tmp_path, "omega", ["1", "2", "3"], "OMEGA")
    with FakeOpenAI(prefers("OMEGA", "ALPHA")) as server:
        run = run_script("evaluate.py", "pairwise", "--prompts_file", str(prompts), "--models", "alpha=/a", "omega=/o",
                         "--judge_model", "judge-y", "--judge_base_url", server.base_url, "--mt_bench_data",
                         str(mt_data), "--output_dir", str(tmp_path))
        assert server.count == 6  # 3 prompts, one turn, both orders; no reference answers for own prompts
        assert all("[The Start of Assistant A's Answer]" in r["messages"][-1]["content"] for r in server.requests)
    stats = overall(run, "omega")  # the baseline defaults to the first of --models
    assert (stats["win"], stats["n"], stats["adjusted_win_rate"]) == (3, 3, 1.0)
    # Categories come from the file alone: a row without one counts under "prompts" (no preset's rule guesses it).
    assert list(run["pairs"][0]["by_category"]) == ["writing", "math", "prompts"]


def test_a_missing_model_is_refused_before_the_first_model_answers(sft_run, tmp_path, monkeypatch):
    """A model path that is not there was found at its turn, after the models before it had answered every
    question (minutes of a 7B model on a GPU; found by an audit). Every model that will answer is checked first; one
    whose answers are all there need not be (its folder may be gone)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("name three fruits.", "Hi!")))
    write_answers(tmp_path, "alpha", ["1", "2"], "ALPHA")
    with pytest.raises(UserError, match=r"^model not found: /nowhere/beta is no local folder"):
        run_script("evaluate.py", "pairwise", "--prompts_file", str(prompts), "--models", "alpha=/a",
                   f"sft={sft_run['run_folder']}", "beta=/nowhere/beta", "--judge_model", "rule", "--max_new_tokens",
                   "8", "--output_dir", str(tmp_path))
    assert not (tmp_path / "model_answer" / "sft.jsonl").exists()  # nothing answered before the refusal
    # A typo that is no Hub id either (runs/tiny--sft, runs/tiny-sft!) was huggingface_hub's traceback, in vibes too.
    for typo, why in (("runs/tiny--sft", "Cannot have -- or .. in repo_id"), ("runs/tiny-sft!",
                                                                              "Repo id must use alphanumeric chars")):
        with pytest.raises(UserError, match=rf"^model not found: {re.escape(typo)} is no local folder \(relative to "
                                            rf"the working folder .*\), and not a Hub id \({why}.*\); check the path$"):
            run_script("evaluate.py", "vibes", "--model_id", typo, "--prompts", "Hi")
    # vibes' second model is checked before the first one loads (a mistyped --compare_to came after its answers).
    from alignkit.modeling import generation

    loaded = []
    monkeypatch.setattr(generation, "load_generator", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    with pytest.raises(UserError, match=r"^model not found: /nowhere/beta is no local folder"):
        run_script("evaluate.py", "vibes", "--model_id", str(sft_run["run_folder"]), "--compare_to", "/nowhere/beta",
                   "--prompts", "Hi", "--max_new_tokens", "4")
    assert not loaded


def test_one_model_under_two_names_is_said_once(sft_run, tmp_path, alignkit_log):
    """`--models sft=runs/tiny-sft sft2=runs/tiny-sft` answered twice and judged every tie without a word (found
    by an audit): a copy-paste slip that costs generation time and judge money. Said in one line."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("name three fruits.", "Hi!")))
    folder = str(sft_run["run_folder"])
    run_script("evaluate.py", "pairwise", "--prompts_file", str(prompts), "--models", f"sft={folder}",
               f"sft2={folder}/", "--judge_model", "rule", "--max_new_tokens", "8", "--output_dir", str(tmp_path))
    said = [r.getMessage() for r in alignkit_log.records if "are the same model as loaded" in r.getMessage()]
    assert said == ["sft and sft2 are the same model as loaded, sampled alike: their answers are the same, so their "
                    "matches measure only the judge's position bias; pass each model once unless that is the point"]


def test_pairwise_takes_label_py_s_python_judges(mt_data, tmp_path):
    """--judge_model python:FILE:FUNCTION was taken for a model name at the OpenAI endpoint (found by an audit):
    label.py's python: judges judge pairwise too, their returns read as label.py reads them, keyed on their code;
    MT-Bench refuses them in one line (it is an LLM's benchmark)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("one?", "two?", "three?")))
    write_answers(tmp_path, "alpha", ["1", "2", "3"], "ALPHA")
    write_answers(tmp_path, "omega", ["1", "2", "3"], "OMEGA")
    rules = tmp_path / "prefs.py"
    rules.write_text("def judge(prompt, a, b):\n    return 'a' if 'ALPHA' in a else '[[B]]' if 'ALPHA' in b else 'tie'\n")

    def pairwise():
        return run_script("evaluate.py", "pairwise", "--prompts_file", str(prompts), "--models", "omega=/o",
                          "alpha=/a", "--judge_model", f"python:{rules}:judge", "--output_dir", str(tmp_path))

    run = pairwise()
    stats = overall(run)
    assert (stats["win"], stats["loss"], stats["n"], stats["adjusted_win_rate"]) == (3, 0, 3, 1.0)
    # Named by its spec everywhere (the evaluate.py audit of session 98: the table and each record said "rule"), and
    # a rerun takes its verdicts.
    spec = f"python:{rules}:judge"
    assert json.loads((tmp_path / "results.json").read_text())["judge"] == run["pairs"][0]["judge"] == spec
    assert {json.loads(line)["judge"][0] for line in judgments.judgment_path(tmp_path, spec).read_text().splitlines()} \
        == {spec}
    assert overall(pairwise()) == stats and len(judgments.judgment_path(tmp_path, spec).read_text().splitlines()) == 3
    rules.write_text("def judge(prompt, a, b):\n    return 'B' if 'ALPHA' in a else 'A' if 'ALPHA' in b else 'tie'\n")
    assert overall(pairwise())["loss"] == 3  # the edited rule judges again: no verdict of the old one is kept
    with pytest.raises(ConfigError, match=r"^--judge_model 'python:.*': .*has no function 'nope'"):
        run_script("evaluate.py", "pairwise", "--prompts_file", str(prompts), "--models", "omega=/o", "alpha=/a",
                   "--judge_model", f"python:{rules}:nope", "--output_dir", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^--judge_model python:\S+ judges `evaluate.py pairwise` only: MT-Bench is "
                                          r"judged by an LLM"):
        mt_bench(types.SimpleNamespace(base_url="http://127.0.0.1:9/v1"), tmp_path, "--judge_model",
                 f"python:{rules}:judge")


def test_a_missing_judge_key_fails_before_any_work(mt_data, tmp_path):
    for extra, variable in [((), "OPENAI_API_KEY"), (("--judge_api_key_env", "MY_JUDGE_KEY"), "MY_JUDGE_KEY")]:
        with pytest.raises(ConfigError, match=f"{variable} is not set"):
            run_script("evaluate.py", "mt_bench", "--models", "a=/nowhere/a", "b=/nowhere/b", "--judge_model", "gpt-4o",
                       "--output_dir", str(tmp_path), *extra)
    assert not (tmp_path / "model_answer").exists()


def test_a_wrong_data_path_is_named_before_the_judge_s_key(tmp_path):
    """Without a key, a wrong --mt_bench_data or --prompts_file was reported as the missing key; once the key was set,
    the path in the next cell: the files are checked first."""
    with pytest.raises(ConfigError, match=r"^--mt_bench_data \S+/nowhere lacks judge_prompts.jsonl"):
        run_script("evaluate.py", "mt_bench", "--models", "a=/nowhere/a", "b=/nowhere/b", "--judge_model", "gpt-4o",
                   "--mt_bench_data", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^--prompts_file \S+/missing.jsonl not found; check the path$"):
        run_script("evaluate.py", "pairwise", "--models", "a=/nowhere/a", "b=/nowhere/b", "--judge_model", "gpt-4o",
                   "--prompts_file", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Generation with the tiny models


def test_mt_bench_answers_both_turns_with_history_and_resumes(mt_data, sft_run, tmp_path, monkeypatch):
    from alignkit.modeling import generation

    calls = []
    real = generation.generate

    def spy(model, tokenizer, conversations, **kw):
        calls.append(([list(c) for c in conversations], kw))  # a copy: the caller extends them afterwards
        return real(model, tokenizer, conversations, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    models = ("base=" + presets.paths()["model"], f"sft={sft_run['run_folder']}")
    args = ["--models", *models, "--question_ids", "81", "111", "--max_new_tokens", "6", "--judge_model", "j",
            "--mt_bench_data", str(mt_data), "--output_dir", str(tmp_path)]
    with FakeOpenAI(lambda body: "[[C]]") as server:  # one judge for both runs: its URL is part of the key
        run = run_script("evaluate.py", "mt_bench", *args, "--judge_base_url", server.base_url)
        assert len(calls) == 8  # per model: one batch per temperature (writing 0.7, math 0.0) x 2 turns
        temperatures = sorted({kw["temperature"] for _, kw in calls})
        assert temperatures == [0.0, 0.7]  # FastChat's per-category temperatures (math 0.0, writing 0.7)
        second_turns = [c for conversations, _ in calls for c in conversations if len(c) == 3]
        assert second_turns and all(c[1]["role"] == "assistant" for c in second_turns)
        common, _ = fastchat_compat.load()
        loaded = common.load_model_answers(str(tmp_path / "model_answer"))  # FastChat reads our answer files
        assert set(loaded) == {"base", "sft"} and set(loaded["sft"]) == {81, 111}
        for answer in loaded["sft"].values():
            assert len(answer["choices"][0]["turns"]) == 2 and answer["model_id"] == "sft"
            first_turn = answer["choices"][0]["turns"][0]
            assert any(c[1]["content"] == first_turn for c in second_turns)  # the first answer is in the history
        assert overall(run, "sft")["tie"] == 4
        # A run killed while writing: one full answer and a torn line. The rerun answers only what is missing.
        path = mtbench.answer_path(tmp_path, "sft")
        first, second = path.read_text().splitlines()
        path.write_text(first + "\n" + second[: len(second) // 2])
        calls.clear()
        before = server.count
        run_script("evaluate.py", "mt_bench", *args, "--judge_base_url", server.base_url)
        assert len(calls) == 2 and all(len(conversations) == 1 for conversations, _ in calls)  # sft, question 111
        # The regenerated answer's matches are judged again, the others are not; at temperature 0 it is the same
        # text, so its requests are the ones already paid for: their kept answers give the verdicts.
        assert server.count - before == 0
        again = [r for r in judgments.read_judgments(judgments.judgment_path(tmp_path, "j")).values()
                 if r["question_id"] == 111 and "sft" in (r["model_1"], r["model_2"])]
        assert again and all(r["answer_ids"][[r["model_1"], r["model_2"]].index("sft")] ==
                             mtbench.read_answers(path)[111]["answer_id"] for r in again)
        # Another folder, the same models under other NAMEs (rlaif.py's next round): --answers_from takes their
        # answers from this one by key, and loads no model; under other sampling nothing is taken.
        calls.clear()
        renamed = [f"{name}2={source}" for name, source in (m.split("=", 1) for m in models)]
        run_script("evaluate.py", "mt_bench", "--models", *renamed, *args[3:-1], str(tmp_path / "next"),
                   "--answers_from", str(tmp_path), "--judge_base_url", server.base_url)
        assert not calls
        assert {q: a["choices"] for q, a in mtbench.read_answers(mtbench.answer_path(tmp_path / "next", "sft2")).items()} \
            == {q: a["choices"] for q, a in mtbench.read_answers(path).items()}
        run_script("evaluate.py", "mt_bench", "--models", *renamed, *args[3:6], "--max_new_tokens", "5", *args[8:-1],
                   str(tmp_path / "shorter"), "--answers_from", str(tmp_path), "--judge_base_url", server.base_url)
        assert len(calls) == 8
    assert len(mtbench.read_answers(path)) == 2
    with pytest.raises(ConfigError, match="holds answers by"):
        run_script("evaluate.py", "mt_bench", "--models", "base=elsewhere/model", models[1], *args[3:],
                   "--judge_base_url", "http://127.0.0.1:9/v1")
    # Answers made under other sampling settings are never taken for new ones (the answer cache's key).
    assert args[6:8] == ["--max_new_tokens", "6"]
    # The refusal names what changed (it listed every possible cause).
    for changed, named in ((["--max_new_tokens", "7"], r"another --max_new_tokens \(--max_new_tokens 6 then, 7 now\)"),
                           (["--max_new_tokens", "6", "--top_p", "0.9"], r"another --top_p \(--top_p 1.0 then, 0.9 now\)"),
                           (["--max_new_tokens", "6", "--dtype", "bf16"], r"another model as loaded \(its loader settings \(--dtype \S+ then, bf16 now\)\)")):
        # Both models' answers are stale: both files named at once (the evaluate.py audit of session 28: one per
        # rerun, the user deleting one and being told of the next).
        with pytest.raises(ConfigError, match=rf"base.jsonl, line 1: this answer was made under {named}.* \(refused "
                                              rf"too, each for its own reason: \S+sft.jsonl\)$"):
            run_script("evaluate.py", "mt_bench", *args[:6], *changed, *args[8:],
                       "--judge_base_url", "http://127.0.0.1:9/v1")
        # A refused run leaves the folder's settings record as the answers beside it were made (it wrote its own).
        saved = json.loads((tmp_path / "evaluate_config.json").read_text())
        assert saved["max_new_tokens"] == 6 and saved["top_p"] == 1.0 and saved["dtype"] != "bf16"
    # ... and so does one refused for a model that is not there (the evaluate.py audit of session 98: the settings
    # record was written before the models to load were checked).
    with pytest.raises(UserError, match="model not found: .*tiny-dpoo"):
        run_script("evaluate.py", "mt_bench", *args[:3], f"typo={tmp_path / 'runs' / 'tiny-dpoo'}", *args[3:],
                   "--judge_base_url", "http://127.0.0.1:9/v1")
    assert json.loads((tmp_path / "evaluate_config.json").read_text())["models"] == list(models)
    # An upgraded library: named with its versions (its refusal named two digests of the model as loaded).
    from alignkit.modeling import identity

    installed = dict(identity._installed())
    monkeypatch.setattr(identity, "_installed", lambda: {**installed, "transformers": "99.0"})
    with pytest.raises(ConfigError, match=rf"line 1: this answer was made under another library versions \(library "
                                          rf"versions .*transformers {installed['transformers']} then, .*transformers "
                                          rf"99\.0 now\)"):
        run_script("evaluate.py", "mt_bench", *args, "--judge_base_url", "http://127.0.0.1:9/v1")
    monkeypatch.setattr(identity, "_installed", lambda: installed)
    # Answers recorded before their settings were: the refusal names every possible cause.
    for made in path.parent.glob("*.jsonl"):
        made.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "settings"}) + "\n"
                                for line in made.read_text().splitlines()))
    with pytest.raises(ConfigError, match="generated by another model as loaded .* or under other sampling"):
        run_script("evaluate.py", "mt_bench", *args[:6], "--max_new_tokens", "7", *args[8:],
                   "--judge_base_url", "http://127.0.0.1:9/v1")


def test_vibes_asks_a_repeated_prompt_once_and_says_how_many_were(monkeypatch, alignkit_log):
    """The tiny preset's vibes printed all 64 prompts, "name three animals." answered three times (the same seed:
    the same answer); label.py drops repeats. So does vibes now, in one line (the notebook audit)."""
    from alignkit.core.config import VibesSettings
    from alignkit.evals import evaluation
    from alignkit.modeling import generation, lineage, model_folders

    asked = []

    class Generator:
        as_loaded = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __call__(self, conversations, **kw):
            asked.extend(c[-1]["content"] for c in conversations)
            return ["ok"] * len(conversations)

    monkeypatch.setattr(generation, "load_generator", lambda *a: Generator())
    monkeypatch.setattr(model_folders, "check_model_sources", lambda *a: None)
    monkeypatch.setattr(lineage, "check_models", lambda *a: None)
    s = VibesSettings(model_id="m", prompts=["name three animals.", "hi", "name three animals.", "hi", "bye",
                                             "name three animals."])
    prompts, _, answers = evaluation.vibes(s, "transformers")
    assert prompts == asked == ["name three animals.", "hi", "bye"] and answers == {"m": ["ok"] * 3}
    said = [r.getMessage() for r in alignkit_log.records if "prompts (" in r.getMessage()]
    assert said == ["vibes: 3 prompts (3 repeated ones dropped)"]


def test_vibes_base_adapter_and_merged_side_by_side(tiny_cache, sft_run, tmp_path, capsys):
    from alignkit.modeling.merge import merge_adapters

    adapter = str(sft_run["run_folder"])
    merged = str(merge_adapters(adapter, tmp_path / "merged"))
    out = tmp_path / "vibes.jsonl"
    prompts = ["name three fruits.", "Hello, who are you?", "give me three tools."]  # a comma stays in its prompt
    run_script("evaluate.py", "vibes", "--model_id", adapter, "--compare_to", merged, "--prompts", *prompts,
               "--temperature", "0", "--max_new_tokens", "12", "--output_file", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for row in rows:
        (a, b) = row["answers"]
        assert (a["model_id"], b["model_id"]) == (adapter, merged)
        assert a["answer"] and a["answer"] == b["answer"]  # greedy: the merged model answers like adapter + base
    printed = capsys.readouterr().out
    assert all(p in printed for p in prompts) and " | " in printed
    # --backend transformers is what auto picked here (no vLLM, no GPU): the same answers.
    explicit = tmp_path / "explicit.jsonl"
    run_script("evaluate.py", "vibes", "--model_id", adapter, "--prompts", *prompts, "--temperature", "0",
               "--max_new_tokens", "12", "--backend", "transformers", "--output_file", str(explicit))
    assert [[a["answer"] for a in json.loads(line)["answers"]] for line in explicit.read_text().splitlines()] == \
        [[row["answers"][0]["answer"]] for row in rows]
    # The file says how each model was loaded and the system prompt (one made with it looked like one without).
    assert rows[0]["answers"][0]["loaded_with"]["model_id"] == adapter and rows[0]["generation"]["system_prompt"] is None
    assert json.loads(explicit.read_text().splitlines()[0])["answers"][0]["loaded_with"]["backend"] == "transformers"
    # `auto` as given, and what it became (session 31's note: on a GPU, auto is bf16 and 4-bit, unrecorded).
    given = rows[0]["answers"][0]["loaded_with"]
    assert (given["dtype"], given["quantization"]) == ("auto", "auto")
    assert given["as_loaded"] == {"backend": "transformers", "dtype": "float32", "quantization": "none"}
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("name three animals.\n\nlist three sports.\n")
    run_script("evaluate.py", "vibes", "--model_id", presets.paths()["model"], "--prompts_file", str(prompts_file),
               "--max_new_tokens", "8", "--output_file", str(out), "--system_prompt", "Answer briefly.",
               "--chat_template_kwargs", '{"x": 1}')
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["name three animals.", "list three sports."]
    assert rows[0]["generation"]["system_prompt"] == "Answer briefly."
    assert rows[0]["answers"][0]["loaded_with"]["chat_template_kwargs"] == {"x": 1}


# ---------------------------------------------------------------------------------------------------------
# The tiny preset: DPO against SFT on the preset's prompts, rule-judged


@pytest.fixture(scope="module")
def tiny_pairwise(sft_run, dpo_run, tmp_path_factory):
    """`python evaluate.py pairwise --preset tiny` on the session's SFT and DPO runs: (globals, output folder)."""
    out = tmp_path_factory.mktemp("pairwise-tiny")
    args = ("evaluate.py", "pairwise", "--preset", "tiny", "--models", f"sft={sft_run['run_folder']}",
            f"dpo={dpo_run['run_folder']}", "--output_dir", str(out))
    return run_script(*args), out, args


def test_tiny_pairwise_runs_the_flow_offline(tiny_pairwise, capsys):
    run, out, args = tiny_pairwise
    (pair,) = run["pairs"]
    assert (pair["model"], pair["opponent"], pair["judge"]) == ("dpo", "sft", "rule")
    stats = pair["overall"]
    assert stats["n"] == 29 and stats["error"] == 0
    assert stats["ci95"][0] <= stats["adjusted_win_rate"] <= stats["ci95"][1]
    assert set(pair["by_category"]) <= set(presets.CATEGORIES)
    assert (out / "results.png").stat().st_size > 10_000
    again = run_script(*args)
    assert again["todo"] == [] and again["pairs"][0]["overall"] == stats
    printed = capsys.readouterr().out
    assert "dpo vs sft" in printed and "overall" in printed and "adj. win rate" in printed
    assert "sft: all 29 questions already answered" in printed


def test_tiny_dpo_beats_sft(tiny_pairwise):
    """DPO wins more than it loses, beyond the bootstrap's 95% interval. (The bar was an adjusted win rate of 0.7; since
    sft.py holds out whole prompts, 4 of the tiny task's 32 prompts are unseen by SFT and it measured 0.66, CI
    0.59-0.74: 26 wins, 5 losses, 33 ties.)"""
    run, _, _ = tiny_pairwise
    overall = run["pairs"][0]["overall"]
    assert overall["ci95"][0] > 0.5 and overall["win"] > 3 * overall["loss"]


# ---------------------------------------------------------------------------------------------------------
# Results arithmetic


def test_outcomes_rates_and_bootstrap_interval():
    record = lambda g1, g2: {"g1_winner": g1, "g2_winner": g2}  # noqa: E731
    assert results.outcome(record("model_1", "model_1")) == "win"
    assert results.outcome(record("model_2", "model_2")) == "loss"
    assert results.outcome(record("model_1", "model_2")) == "tie"  # the orders disagree: a position preference
    assert results.outcome(record("tie", "tie")) == "tie"
    assert results.outcome(record("model_1", "error")) == "error"
    games = [(i, o) for i, o in enumerate(["win"] * 6 + ["loss"] * 2 + ["tie"] * 2 + ["error"])]
    s = results.summarize(games, rounds=2000, seed=1)
    assert (s["n"], s["error"], s["win_rate"], s["adjusted_win_rate"]) == (10, 1, 0.6, 0.7)
    assert 0.35 < s["ci95"][0] < 0.7 < s["ci95"][1] <= 1.0
    assert results.summarize([(1, "error")])["adjusted_win_rate"] is None
    # Questions resample whole: two turns of one question move together.
    paired = results.summarize([(1, "win"), (1, "win"), (2, "loss"), (2, "loss")], rounds=500)
    assert paired["adjusted_win_rate"] == 0.5 and paired["ci95"] == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------
# Generation backends: vLLM (faked here: no GPU, no vllm package) or transformers, the same answer files


def test_backend_vllm_without_vllm_stops_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from alignkit.modeling import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="--backend vllm needs vLLM: pip install vllm"):
        run_script("evaluate.py", "vibes", "--model_id", "/nowhere/model", "--prompts", "hi", "--backend", "vllm",
                   "--output_file", str(tmp_path / "vibes.jsonl"))
    with pytest.raises(ConfigError, match="--backend vllm needs vLLM: pip install vllm"):
        run_script("evaluate.py", "mt_bench", "--models", "a=/nowhere/a", "b=/nowhere/b", "--judge_model", "j",
                   "--judge_base_url", "http://127.0.0.1:9/v1", "--backend", "vllm", "--output_dir", str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"--backend: 'cuda' is not one of auto, vllm, transformers"):
        run_script("evaluate.py", "vibes", "--prompts", "hi", "--backend", "cuda")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_mt_bench_answers_on_vllm_in_the_transformers_format(mt_data, sft_run, tmp_path, monkeypatch):
    from fake_vllm import install

    from alignkit.modeling import models

    adapter = str(sft_run["run_folder"])
    args = ["--models", "base=" + presets.paths()["model"], f"sft={adapter}", "--question_ids", "81", "111",
            "--max_new_tokens", "6", "--judge_model", "j", "--mt_bench_data", str(mt_data)]
    with FakeOpenAI(lambda body: "[[C]]") as server:
        run_script("evaluate.py", "mt_bench", *args, "--backend", "transformers", "--output_dir", str(tmp_path / "hf"),
                   "--judge_base_url", server.base_url)
        fake = install(monkeypatch, cuda=True)  # auto now finds vLLM and a GPU
        monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("vLLM was chosen: no transformers model"))
        run = run_script("evaluate.py", "mt_bench", *args, "--output_dir", str(tmp_path / "vllm"),
                         "--judge_base_url", server.base_url)
    assert overall(run, "sft")["tie"] == 4  # judged like any answers

    base_llm, sft_llm = fake.llms  # one engine per model, the adapter as a LoRA request on its base
    assert base_llm.kwargs["model"] == presets.paths()["model"] and base_llm.kwargs["enable_lora"] is False
    assert sft_llm.kwargs["enable_lora"] is True
    assert Path(sft_llm.kwargs["model"]).resolve() == Path(presets.paths()["model"]).resolve()
    assert {c["lora"] for c in base_llm.chats} == {None} and {c["lora"].lora_path for c in sft_llm.chats} == {adapter}
    for llm in fake.llms:  # per temperature (writing 0.7, math 0.0), both turns; turn 2 sees the first answer
        assert [({p["temperature"] for p in c["params"]}, len(c["messages"][0])) for c in llm.chats] == \
            [({0.7}, 1), ({0.7}, 3), ({0.0}, 1), ({0.0}, 3)]
        assert all(p["max_tokens"] == 6 for c in llm.chats for p in c["params"])
        # Each question and turn its own seed (one request each), the same the transformers backend samples with.
        seeds = [[p["seed"] for p in c["params"]] for c in llm.chats]
        assert all(len(set(row)) == len(row) for row in seeds) and len({s for row in seeds for s in row}) == 4
        first, second = llm.chats[0]["messages"][0], llm.chats[1]["messages"][0]
        assert second[:2] == [first[0], {"role": "assistant", "content": f"vllm says: {first[0]['content']}"}]

    common, _ = fastchat_compat.load()
    for name in ("base", "sft"):
        hf = mtbench.read_answers(mtbench.answer_path(tmp_path / "hf", name))
        vllm = mtbench.read_answers(mtbench.answer_path(tmp_path / "vllm", name))
        assert set(hf) == set(vllm) == {81, 111}
        for qid, record in vllm.items():
            other = hf[qid]
            assert set(record) == set(other)
            same = ("question_id", "model_id", "source", "generation")
            assert {k: record[k] for k in same} == {k: other[k] for k in same}
            turns = record["choices"][0]["turns"]
            assert len(turns) == len(other["choices"][0]["turns"]) == 2 and turns[0].startswith("vllm says: ")
    assert set(common.load_model_answers(str(tmp_path / "vllm" / "model_answer"))) == {"base", "sft"}


def test_a_second_pairwise_run_into_the_same_folder_is_refused(tmp_path):
    """Two evaluate.py runs into one --output_dir both generated every answer and both paid the judge for the
    matches they shared. The folder is held for one run now; the same process may take it again (a notebook)."""
    import fcntl

    from alignkit.core.journal import InUse
    from alignkit.evals.evaluation import Pairwise, parse_command

    out, prompts = tmp_path / "pw", tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    _, s = parse_command(["pairwise", "--models", "a=org/a", "b=org/b", "--judge_model", "rule", "--prompts_file",
                          str(prompts), "--output_dir", str(out)])
    Pairwise.start("pairwise", s)
    Pairwise.start("pairwise", s)  # a notebook cell run again
    from alignkit.core import journal

    journal._held.pop(str((out / ".evaluate.lock").resolve())).close()  # as if that run were another process
    with open(out / ".evaluate.lock", "a+b") as running:
        fcntl.flock(running.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InUse, match=f"^{out} is in use by another evaluate.py run; let it finish, or pass "
                                        "another --output_dir$"):
            Pairwise.start("pairwise", s)


def test_pairwise_judges_a_repeated_prompt_once(tmp_path, alignkit_log):
    """The README's pairwise command over the tiny prompts file (64 rows, 29 distinct prompts) judged each repeat,
    and the bootstrap CI counted the repeats as independent questions (the review of session 38)."""
    from alignkit.evals.evaluation import Pairwise, parse_command

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n"
                               for p, c in (("hi", "a"), ("bye", "b"), ("hi", "c"), ("hi", "a"))))
    command, s = parse_command(["pairwise", "--models", "a=x", "b=y", "--judge_model", "rule", "--prompts_file",
                                str(prompts), "--output_dir", str(tmp_path / "pw")])
    run = Pairwise.start(command, s)
    run.load_questions()
    assert [(q["question_id"], q["category"], q["turns"]) for q in run.questions] == [(1, "a", ["hi"]),
                                                                                      (2, "b", ["bye"])]
    assert f"{prompts}: 2 prompts (2 repeated ones dropped: each is judged once)" in alignkit_log.text


def test_pairwise_question_ids_of_a_repeated_prompt_s_later_row_select_the_prompt(tmp_path, alignkit_log):
    """pairwise judges a repeated prompt once, its first row's id standing for it: --question_ids naming a later row
    of it said "not in" the file, of a row that is there. It selects the prompt, said in one line."""
    from alignkit.evals.evaluation import Pairwise, parse_command

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "question_id": i}) + "\n"
                               for i, p in ((10, "hi"), (20, "bye"), (30, "hi"), (40, "so"), (50, "hi"))))

    def selected(*ids: str) -> list[int]:
        command, s = parse_command(["pairwise", "--models", "a=x", "b=y", "--judge_model", "rule", "--prompts_file",
                                    str(prompts), "--question_ids", *ids, "--output_dir", str(tmp_path / "pw")])
        run = Pairwise.start(command, s)
        run.load_questions()
        return [q["question_id"] for q in run.questions]

    assert selected("30", "40") == [10, 40]
    said = [r.getMessage() for r in alignkit_log.records if r.getMessage().startswith("--question_ids")]
    assert said == ["--question_ids 30 repeats question 10's prompt, judged as 10"]
    alignkit_log.clear()
    assert selected("50", "30", "10") == [10]  # the prompt once, however many of its rows are named
    said = [r.getMessage() for r in alignkit_log.records if r.getMessage().startswith("--question_ids")]
    assert said == ["--question_ids 50 repeats question 10's prompt, judged as 10; 30 repeats question 10's prompt, "
                    "judged as 10"]
    with pytest.raises(ConfigError, match=r"--question_ids 60 not in .*prompts\.jsonl \(its ids run 10\.\.40\)"):
        selected("60")


def test_a_pairwise_run_s_steps_run_in_order_under_the_settings_it_started_with(tiny_cache, tmp_path):
    """evaluate.py's pairwise cells in a notebook: the settings cell run again (max_questions 4) with the later cells
    run alone answered and judged all 64 questions under the old settings and wrote them as the new run's results; a
    cell before the one it needs gave a FastChat KeyError or a pathlib TypeError; the Judging and Results cells after
    the judge cell alone overwrote a good results.json with an empty table. Each is one line naming the cell."""
    from alignkit.core.errors import UserError
    from alignkit.evals.evaluation import Pairwise, parse_command
    from alignkit.modeling import presets

    model = presets.paths()["model"]
    argv = ["pairwise", "--models", f"a={model}", f"b={model}", "--judge_model", "rule", "--prompts_file",
            presets.paths()["prompts"], "--max_questions", "3", "--max_new_tokens", "4", "--quantization", "none",
            "--output_dir", str(tmp_path / "pw")]
    command, s = parse_command(argv)
    run = Pairwise.start(command, s)
    with pytest.raises(UserError, match=r"^run the 'Questions' cell first: the cells from 'The judge' on run in "
                                        r"order$"):
        run.make_matches()
    run.load_questions()
    run.answer("transformers")
    with pytest.raises(UserError, match=r"^run the 'Matches' cell first"):
        run.judge()
    run.make_matches()
    run.judge()
    pairs, results_file, _ = run.report()
    good = results_file.read_text()
    assert json.loads(good)["pairs"] and len(json.loads(good)["questions"]) == 3
    run.load_questions()  # the questions again: the later steps go again too
    with pytest.raises(UserError, match=r"^run the 'Answers' cell first"):
        run.report()
    assert results_file.read_text() == good
    # Verdicts gone (a judgment file moved away): no empty table over the good one.
    run.load_questions()
    run.answer("transformers")
    run.make_matches()
    run.judge()
    run.judgment_file.rename(run.judgment_file.with_suffix(".moved"))
    with pytest.raises(UserError, match=r"^no verdicts of this run's \d+ matches in .*, so no table: results.json "
                                        r"and results.png are left as they were"):
        run.report()
    assert results_file.read_text() == good
    # The settings cell again, with another setting: the run started before refuses its next step.
    parse_command([*argv[:-2], "--max_questions", "2", *argv[-2:]])
    with pytest.raises(UserError, match=r"^the settings changed since 'The judge' cell started this pairwise run: "
                                        r"run the cells from 'The judge' on again$"):
        run.answer("transformers")
    # Edited in place, the same.
    command, s = parse_command(argv)
    run = Pairwise.start(command, s)
    s.max_questions = 2
    with pytest.raises(UserError, match=r"^the settings changed since 'The judge' cell started this pairwise run "
                                        r"\(max_questions\)"):
        run.load_questions()
    assert results_file.read_text() == good


def test_a_step_whose_cell_stopped_with_an_error_is_named_so_not_as_one_never_run(tiny_cache, tmp_path):
    """Found by a notebook audit: with the Answers cell stopped with an error (a model folder not there, answers kept
    under another max_new_tokens), the Matches, Judging and Results cells said "run the 'Answers' cell first", and
    running it again as told failed the same way. A step that started and did not finish says its cell stopped
    with an error, to fix and run again; one never run still says to run it first."""
    from alignkit.core.errors import UserError
    from alignkit.evals.evaluation import Pairwise, parse_command
    from alignkit.modeling import presets

    model = presets.paths()["model"]
    argv = ["pairwise", "--models", f"a={model}", f"b={tmp_path / 'gone'}", "--judge_model", "rule",
            "--prompts_file", presets.paths()["prompts"], "--max_questions", "2", "--max_new_tokens", "4",
            "--quantization", "none", "--output_dir", str(tmp_path / "pw")]
    command, s = parse_command(argv)
    run = Pairwise.start(command, s)
    run.load_questions()
    with pytest.raises(UserError, match="model not found"):
        run.answer("transformers")
    stopped = (r"^the 'Answers' cell stopped with an error \(see its line\) or was interrupted: fix that and run it "
               r"again, then the cells below it in order$")
    for step in (run.make_matches, run.judge, run.report):
        with pytest.raises(UserError, match=stopped):
            step()
    run.load_questions()  # the questions again: the Answers cell is one not run since, not one that failed
    with pytest.raises(UserError, match=r"^run the 'Answers' cell first: the cells from 'The judge' on run in order$"):
        run.make_matches()


def test_kept_answers_of_the_same_model_named_from_another_folder_are_taken(tmp_path, monkeypatch):
    """Found by the evaluate.py audit of session 28: answers and outputs record their model's path as typed
    (`runs/tiny-sft`), and a rerun from another folder (`h20/runs/tiny-sft`, the same folder) was refused as another
    model's ("holds answers by runs/tiny-sft, not h20/runs/tiny-sft"), though the model as loaded, by content, was
    the same. Where an answer holds its key, the key decides; a path check is left for answers without one."""
    from alignkit.evals import mtbench
    from alignkit.evals.alpacaeval_outputs import read_outputs

    project = tmp_path / "project"
    (project / "runs" / "sft").mkdir(parents=True)
    answers, outputs = tmp_path / "answers.jsonl", tmp_path / "outputs.jsonl"
    answers.write_text(json.dumps({"question_id": 1, "choices": [{"index": 0, "turns": ["hi"]}], "source": "runs/sft",
                                   "settings_key": "K"}) + "\n")
    outputs.write_text(json.dumps({"instruction": "i", "output": "o", "source": "runs/sft", "generation": {"t": 1},
                                   "identity": "I"}) + "\n")
    monkeypatch.chdir(tmp_path)  # the project's parent: the same folder is project/runs/sft from here
    assert list(mtbench.read_answers(answers, "project/runs/sft", key="K")) == [1]
    assert list(read_outputs(outputs, "project/runs/sft", {"t": 1}, identity="I")) == ["i"]
    with pytest.raises(ConfigError, match="holds answers by runs/sft, not project/runs/sft"):  # another model
        mtbench.read_answers(answers, "project/runs/sft", key="other")
    with pytest.raises(ConfigError, match="holds outputs by runs/sft, not project/runs/sft"):
        read_outputs(outputs, "project/runs/sft", {"t": 1}, identity="other")


def test_a_copied_model_changed_since_is_refused_for_its_content_not_its_path(tmp_path, monkeypatch):
    """Found by the evaluate.py audit of session 98: answers made by runs/tiny-dpo were taken from a copy of runs/
    (the same content), but once a byte of the copy's adapter changed they were refused as another model's ("holds
    answers by runs/tiny-dpo, not /other/tiny-dpo: give this model another NAME"). The folders of its chain pair up
    by name, so the refusal says what changed, as it does of a folder changed in place."""
    from alignkit.modeling.identity import changed_parts

    old, new = tmp_path / "project" / "runs", tmp_path / "other"
    for folder in (old / "dpo", new / "dpo", new / "sft", tmp_path / "elsewhere" / "model"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")

    def settings(runs, dpo_digest):
        return {"model as loaded": dpo_digest, "--max_new_tokens": 16, mtbench.PARTS: {
            "loader settings": "L", str(runs / "dpo"): dpo_digest, str(runs / "sft"): "s1", "base/model": "b1",
            "hardware": "cpu", "backend": "transformers"}}

    answers = tmp_path / "dpo.jsonl"
    answers.write_text(json.dumps({"question_id": 1, "choices": [{"index": 0, "turns": ["hi"]}], "source": "runs/dpo",
                                   "settings_key": "K", "settings": settings(old, "d1")}) + "\n")
    assert list(mtbench.read_answers(answers, str(new / "dpo"), key="K", settings=settings(new, "d1"))) == [1]
    with pytest.raises(ConfigError, match=r"line 1: this answer was made under another model as loaded \("
                       rf"{re.escape(str(new / 'dpo'))}: its files changed since \(then at runs/dpo\)\); give"):
        mtbench.read_answers(answers, str(new / "dpo"), key="K2", settings=settings(new, "d2"))
    # Another model under the same NAME is still refused by its path.
    with pytest.raises(ConfigError, match="holds answers by runs/dpo, not"):
        mtbench.read_answers(answers, str(tmp_path / "elsewhere" / "model"), key="K2",
                             settings=settings(tmp_path / "elsewhere", "d2"))
    assert changed_parts(settings(old, "d1")[mtbench.PARTS], settings(new, "d1")[mtbench.PARTS]) is None  # moved


def test_alpaca_eval_outputs_of_a_copied_or_changed_model_are_told_by_content_not_path(tmp_path, monkeypatch):
    """Found by the evaluate.py audit of session 112: AlpacaEval's outputs kept by a model's path what MT-Bench's
    answers no longer do (test above): a copy of runs/ whose adapter changed since was refused as another model's
    ("holds outputs by runs/dpo, not /other/dpo: give this model another --model_name"), and a folder changed in
    place said only "another model as loaded (its files, down its adapter chain, or its loading: ...)". Each output
    records the model's parts beside its key, so its content decides and the refusal names what changed."""
    from alignkit.evals.alpacaeval_outputs import generate_outputs, read_outputs

    old, new = tmp_path / "project" / "runs", tmp_path / "other"
    for folder in (old / "dpo", new / "dpo", tmp_path / "elsewhere" / "model"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")

    def parts(runs, dpo_digest):
        return {"loader settings": "L", str(runs / "dpo"): dpo_digest, str(runs / "sft"): "s1", "base/model": "b1",
                "hardware": "cpu", "backend": "transformers"}

    generation = {"temperature": 0.0, "top_p": 1.0, "num_beams": 1, "max_new_tokens": 8, "seed": 1}
    s = types.SimpleNamespace(**generation, batch_size=2)
    outputs = tmp_path / "dpo.jsonl"
    generate_outputs(lambda messages, **_: ["o"] * len(messages), [{"instruction": "i", "dataset": "d"}], "dpo",
                     "runs/dpo", outputs, s, "I1", parts(old, "d1"))
    assert json.loads(outputs.read_text())["parts"] == parts(old, "d1")  # recorded beside the key
    assert list(read_outputs(outputs, str(new / "dpo"), generation, "I1", parts(new, "d1"))) == ["i"]  # a copy
    with pytest.raises(ConfigError, match=r"line 1: generated by another model as loaded than "
                       rf"{re.escape(str(new / 'dpo'))} now \({re.escape(str(new / 'dpo'))}: its files changed since "
                       r"\(then at runs/dpo\)\): use another --output_dir"):
        read_outputs(outputs, str(new / "dpo"), generation, "I2", parts(new, "d2"))  # the copy changed since
    with pytest.raises(ConfigError, match=r"line 1: generated by another model as loaded than runs/dpo now "
                                          r"\(runs/dpo: its files changed since\): use another --output_dir"):
        read_outputs(outputs, "runs/dpo", generation, "I2", parts(old, "d2"))  # changed in place
    # Another model under the same name is still refused by its path.
    with pytest.raises(ConfigError, match="holds outputs by runs/dpo, not"):
        read_outputs(outputs, str(tmp_path / "elsewhere" / "model"), generation, "I2",
                     parts(tmp_path / "elsewhere", "d2"))


def test_greedy_answers_and_outputs_are_taken_under_another_seed_and_their_old_keys(tmp_path, monkeypatch):
    """Greedy decoding (--temperature 0) reads neither the seed nor --top_p, but MT-Bench answers and AlpacaEval
    outputs were keyed on both: another --seed refused them ("made under another --seed") and answered again. Keys
    drop them there, and an answer recorded with them (before) compares as decoding reads it; sampled answers still
    name the seed that changed."""
    from alignkit.evals.alpacaeval_outputs import _generation, read_outputs
    from alignkit.modeling import identity

    monkeypatch.setattr(identity, "model_identity", lambda loader, backend, resolved=None: {
        "model": "m", "libraries": {"torch": "2"}})
    monkeypatch.setattr("alignkit.modeling.chain.resolve", lambda *a: None)  # no model: its parts are not asked of
    monkeypatch.setattr(identity, "identity_parts", lambda *a: {})

    def settings(**changes):
        return types.SimpleNamespace(**{"temperature": 0.0, "top_p": 1.0, "num_beams": 1, "max_new_tokens": 8,
                                        "seed": 1, **changes})

    def key(**changes):
        return mtbench.answers_key_and_settings(types.SimpleNamespace(model_id="m", revision=None), settings(**changes),
                                                "transformers")

    (greedy, parts), (sampled, sampled_parts) = key(seed=2, top_p=0.5), key(temperature=0.7, seed=2)
    assert greedy == key()[0] and sampled != key(temperature=0.7)[0]
    question = {"question_id": 1, "turns": ["hi"], "category": "math"}

    def answer(then: dict) -> dict:  # recorded before: its key held the seed and top_p, as its settings do
        return {"question_id": 1, "choices": [{"index": 0, "turns": ["hello"]}], "source": "m", "settings_key": "old",
                "settings": {**then, "--seed": 1, "--top_p": 1.0}, "question_key": mtbench.question_key(question)}

    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(answer(parts)) + "\n")
    assert list(mtbench.read_answers(path, "m", key=greedy, settings=parts)) == [1]
    assert mtbench.reuse_answers(tmp_path / "next" / "m.jsonl", [tmp_path / "made"], [question], "m", "m", greedy,
                                 parts) == 0  # nothing there yet
    (tmp_path / "made" / "model_answer").mkdir(parents=True)
    shutil.copy(path, tmp_path / "made" / "model_answer" / "m.jsonl")
    assert mtbench.reuse_answers(tmp_path / "next" / "m.jsonl", [tmp_path / "made"], [question], "m", "m", greedy,
                                 parts) == 1  # another folder's, under another seed
    path.write_text(json.dumps(answer(key(temperature=None)[1])) + "\n")  # FastChat's temperatures then
    with pytest.raises(ConfigError, match=r"--temperature none \(FastChat's per-category temperatures\) then, 0\.0 now"):
        mtbench.read_answers(path, "m", key=greedy, settings=parts)  # said as the user writes it, not Python's None
    path.write_text(json.dumps(answer(key(temperature=0.7, seed=1, top_p=1.0)[1])) + "\n")  # only the temperature
    with pytest.raises(ConfigError, match=r"made under another --temperature \(--temperature 0\.7 then, 0\.0 now\)"):
        mtbench.read_answers(path, "m", key=key()[0], settings=key()[1])  # (it named --top_p and --seed too)
    path.write_text(json.dumps(answer(parts)) + "\n")  # greedy, seed 1 then; greedy, seed 3 and 9 tokens now
    with pytest.raises(ConfigError, match=r"made under another --max_new_tokens \(--max_new_tokens 8 then, 9 now\);"):
        mtbench.read_answers(path, "m", key=key(seed=3, max_new_tokens=9)[0], settings=key(seed=3, max_new_tokens=9)[1])
    path.write_text(json.dumps(answer(sampled_parts)) + "\n")
    with pytest.raises(ConfigError, match=r"made under another --seed \(--seed 1 then, 2 now\)"):
        mtbench.read_answers(path, "m", key=sampled, settings=sampled_parts)
    # AlpacaEval's outputs: compared by their sampling as decoding reads it.
    outputs = tmp_path / "outputs.jsonl"
    recorded = {"temperature": 0.0, "top_p": 1.0, "num_beams": 1, "max_new_tokens": 8, "seed": 1}
    outputs.write_text(json.dumps({"instruction": "i", "output": "o", "source": "m", "generation": recorded}) + "\n")
    assert list(read_outputs(outputs, "m", _generation(settings(seed=2, top_p=0.5)))) == ["i"]
    with pytest.raises(ConfigError, match=r"generated under other sampling \(--max_new_tokens 8 then, 9 now\): use"):
        read_outputs(outputs, "m", _generation(settings(seed=2, max_new_tokens=9)))  # not the seed: greedy reads none
    outputs.write_text(json.dumps({"instruction": "i", "output": "o", "source": "m",
                                   "generation": {**recorded, "temperature": 0.7}}) + "\n")
    with pytest.raises(ConfigError, match=r"generated under other sampling \(--seed 1 then, 2 now\): use another"):
        read_outputs(outputs, "m", _generation(settings(temperature=0.7, seed=2)))


def test_a_judge_answer_paid_for_before_its_match_s_verdict_is_kept(tmp_path):
    """Found by the evaluate.py audit of session 28: a match is asked in both orders and its verdict written once
    both came back, so a Ctrl-C between them lost the first paid answer (14 requests sent, 12 kept) and the rerun
    asked for it again. Each answer is kept as it arrives, keyed by its request and endpoint; --retry_parse_failures
    asks again."""
    import types

    from alignkit.evals import fastchat_compat

    asked = []

    class Client:  # alignkit.core.llm.ChatClient, as far as judging uses it
        model, temperature, max_tokens = "judge", 0.0, 16
        client = types.SimpleNamespace(base_url="http://judge.test/v1/")

        def complete(self, messages):
            asked.append(messages[-1]["content"])
            return f"[[A]] for {messages[-1]['content']}"

    def conv(text):
        return types.SimpleNamespace(to_openai_api_messages=lambda: [{"role": "user", "content": text}])

    kept = tmp_path / "judge_pair.answers.jsonl"
    with fastchat_compat.judging_with(Client(), kept=kept) as common:
        assert common.chat_completion_openai("judge", conv("A then B"), 0, 16) == "[[A]] for A then B"
        # Ctrl-C here: the match's second order never came back, and no verdict was written
    with fastchat_compat.judging_with(Client(), kept=kept) as common:  # the rerun
        assert common.chat_completion_openai("judge", conv("A then B"), 0, 16) == "[[A]] for A then B"
        assert common.chat_completion_openai("judge", conv("B then A"), 0, 16) == "[[A]] for B then A"
    assert asked == ["A then B", "B then A"]
    other = Client()
    other.model = "another-judge"  # another endpoint's answer is its own
    with fastchat_compat.judging_with(other, kept=kept) as common:
        common.chat_completion_openai("judge", conv("A then B"), 0, 16)
    with fastchat_compat.judging_with(Client(), kept=kept, reuse=False) as common:  # --retry_parse_failures
        common.chat_completion_openai("judge", conv("A then B"), 0, 16)
    assert asked == ["A then B", "B then A", "A then B", "A then B"]
    # Two equal answers make the same request in both orders: sent once a run (the evaluate.py audit of session 30
    # saw each such match sent twice), the answer kept for both orders; with reuse off too, within the run.
    for reuse in (True, False):
        with fastchat_compat.judging_with(Client(), kept=kept, reuse=reuse) as common:
            assert common.chat_completion_openai("judge", conv("same, same"), 0, 16) == \
                common.chat_completion_openai("judge", conv("same, same"), 0, 16) == "[[A]] for same, same"
    assert asked[4:] == ["same, same", "same, same"]  # once in each run: the second run asks again (reuse off)
    # In parallel (--parallel 2: two matches whose answers are equal), one thread sends it and the other waits for
    # its answer: both were sent (the closing note of session 30).
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    slow, release = Client(), threading.Event()
    slow.complete = lambda messages: (asked.append(messages[-1]["content"]), release.wait(5), "[[B]]")[-1]
    with fastchat_compat.judging_with(slow, kept=kept) as common, ThreadPoolExecutor(2) as pool:
        both = [pool.submit(common.chat_completion_openai, "judge", conv("twice at once"), 0, 16) for _ in range(2)]
        time.sleep(0.3)  # both under way: one asking, one waiting
        release.set()
        assert [f.result() for f in both] == ["[[B]]", "[[B]]"]
    assert asked.count("twice at once") == 1
    # After a Ctrl-C (alignkit.core.journal.threaded), a match under way sends no second order: its first is kept.
    from alignkit.core import journal

    journal._STOPPING.set()
    try:
        with fastchat_compat.judging_with(Client(), kept=kept) as common:
            assert common.chat_completion_openai("judge", conv("never sent"), 0, 16) == common.API_ERROR_OUTPUT
            assert common.chat_completion_openai("judge", conv("A then B"), 0, 16) == "[[A]] for A then B"  # kept
    finally:
        journal._STOPPING.clear()
    assert "never sent" not in asked


def test_a_ctrl_c_delivered_twice_still_keeps_the_judge_answers_under_way(tmp_path):
    """Found by the evaluate.py audit of session 98: `timeout -s INT` (as a launcher that forwards the terminal's
    Ctrl-C to its child) delivers the SIGINT twice, to the process and to its process group. The second, a few
    microseconds after the first, was taken for "Ctrl-C again": the 30 s wait for the calls under way ended at once,
    their paid answers were neither kept nor judged, and the rerun sent them again. Both orders of each match go
    through judging_with as FastChat's play_a_match_pair sends them; the judge answers only once the Ctrl-C is in."""
    import os
    import signal

    from alignkit.core import journal

    asked, interrupted = [], threading.Event()

    class Client:  # alignkit.core.llm.ChatClient, as far as judging uses it
        model, temperature, max_tokens = "judge", 0.0, 16
        client = types.SimpleNamespace(base_url="http://judge.test/v1/")

        def complete(self, messages):
            asked.append(messages[-1]["content"])
            if len(asked) == 3:  # the second match's first order: Ctrl-C while it is under way
                def press_twice():
                    os.kill(os.getpid(), signal.SIGINT)
                    while not journal.stopping():  # the first one's handler ran in the main thread
                        time.sleep(0.001)
                    os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, to the process group
                    time.sleep(0.1)  # the second one's handler has run too (the main thread waits in a queue)
                    interrupted.set()
                threading.Thread(target=press_twice, daemon=True).start()
                interrupted.wait(10)
            return f"[[A]] for {messages[-1]['content']}"

    def conv(text):
        return types.SimpleNamespace(to_openai_api_messages=lambda: [{"role": "user", "content": text}])

    def match(n):
        answer = {"answer_id": f"a{n}", "choices": [{"turns": ["x"]}]}
        return types.SimpleNamespace(question={"question_id": n, "turns": ["q"]}, answer_1=answer, answer_2=answer,
                                     judge=types.SimpleNamespace(prompt_template={}), ref_answer=None)

    path = tmp_path / "judge_pair.jsonl"
    kept = judgments.answers_path(path)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a script (a test worker ignores it)
    try:
        with fastchat_compat.judging_with(Client(), kept=kept) as common, pytest.raises(KeyboardInterrupt):
            def play(m):  # FastChat's two orders of one match
                n = m.question["question_id"]
                g1, g2 = (common.chat_completion_openai("judge", conv(f"{n}{o}"), 0, 16) for o in ("g1", "g2"))
                return {"question_id": n, "g1_judgment": g1, "g2_judgment": g2}

            judgments.judge_matches([match(n) for n in range(1, 5)], play, path, {"judge": "j"}, parallel=1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert asked == ["1g1", "1g2", "2g1"]  # after Ctrl-C, the match under way sends no second order; none starts
    assert [json.loads(line)["text"] for line in kept.read_text().splitlines()] == \
        ["[[A]] for 1g1", "[[A]] for 1g2", "[[A]] for 2g1"]  # the answer under way kept: the rerun reuses it
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["question_id"], r["g1_judgment"], r["g2_judgment"]) for r in records] == \
        [(1, "[[A]] for 1g1", "[[A]] for 1g2"), (2, "[[A]] for 2g1", common.API_ERROR_OUTPUT)]


def test_ctrl_c_at_parallel_1_keeps_the_match_under_way(tmp_path):
    """Found by the Ctrl-C audit of session 30: evaluate.py's default --parallel 1 judged matches in the main thread,
    so a Ctrl-C dropped the request under way (the judge answered into a broken pipe) and the rerun paid again. It goes
    through threaded() too: the match under way finishes and is written, then KeyboardInterrupt."""
    import os
    import signal

    def match(n):
        answer = {"answer_id": f"a{n}", "choices": [{"turns": ["x"]}]}
        return types.SimpleNamespace(question={"question_id": n, "turns": ["q"]}, answer_1=answer, answer_2=answer,
                                     judge=types.SimpleNamespace(prompt_template={}), ref_answer=None)

    release, played = threading.Event(), []

    def play(m):
        played.append(m.question["question_id"])
        if len(played) == 2:  # Ctrl-C while the second match is under way
            threading.Thread(target=lambda: (time.sleep(0.2), os.kill(os.getpid(), signal.SIGINT),
                                             time.sleep(0.2), release.set()), daemon=True).start()
            release.wait(10)
        return {"question_id": m.question["question_id"], "g1_winner": "tie", "g2_winner": "tie"}

    path = tmp_path / "judge_pair.jsonl"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a script (a test worker ignores it)
    try:
        with pytest.raises(KeyboardInterrupt):
            judgments.judge_matches([match(n) for n in range(1, 5)], play, path, {"judge": "j"}, parallel=1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert played == [1, 2]  # nothing started after Ctrl-C
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [1, 2]  # the second kept
