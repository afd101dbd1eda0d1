"""label.py --mode pointwise (alignkit.feedback.pointwise): each answer graded alone against a threshold, written as
KTO data. The tiny preset's rule grades its samples, and kto.py on those labels raises the rule-following rate; an
LLM grader (a real HTTP server speaking the OpenAI API) rates each answer once, cached; bad graders are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script
from openai_server import FakeOpenAI

from alignkit.core.args import ConfigError
from alignkit.core.data import load_unpaired
from alignkit.core.errors import UserError
from alignkit.feedback.pointwise import parse_rating


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_labels(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("pointwise") / "labels.jsonl"
    run_script("label.py", "--preset", "tiny", "--mode", "pointwise", "--judge", "python:alignkit.modeling.presets:score",
               "--output", str(out))
    return out


def test_rule_grades_become_labels_kto_reads(tiny_labels):
    from alignkit.modeling.presets import follows_rule

    out = rows(tiny_labels)
    assert len(out) > 100
    for r in out:
        assert r["label"] == follows_rule(r["prompt"][0]["content"], r["completion"][0]["content"])
        assert r["label"] == (r["grade"] >= 1.0)
    assert 0 < sum(r["label"] for r in out) < len(out)
    assert load_unpaired(str(tiny_labels))["label"] == [r["label"] for r in out]  # kto.py's loader reads it as it is
    summary = json.loads(tiny_labels.with_suffix(".summary.json").read_text())
    assert summary["desirable"] + summary["undesirable"] == len(out)


def test_kto_on_pointwise_labels_raises_rule_following(tiny_labels, tmp_path):
    """The labels are imbalanced (about 1 desirable in 8), so the desirable answers weigh 7 times more, as TRL
    advises; 10 epochs of about 10 steps. Measured: 0.199 -> 0.316 (sampled at T=1)."""
    run = run_script("kto.py", "--preset", "tiny", "--dataset_id", str(tiny_labels), "--desirable_weight", "7",
                     "--num_train_epochs", "10", "--output_dir", str(tmp_path))
    assert run["after"] - run["before"] >= 0.05, (run["before"], run["after"])


def test_grade_pairs_are_each_prompt_s_best_graded_answer_over_its_worst(tiny_labels, tmp_path):
    """--grade_pairs: UltraFeedback's binarization of the grades, for dpo.py (a pointwise run gave KTO rows only)."""
    out = tiny_labels.with_name("graded.jsonl")  # the responses beside it are read, not sampled again
    run_script("label.py", "--preset", "tiny", "--mode", "pointwise", "--judge", "python:alignkit.modeling.presets:score",
               "--output", str(out), "--grade_pairs", "true")
    graded, pairs = rows(out), rows(out.with_suffix(".pairs.jsonl"))
    grades: dict[str, dict[str, float]] = {}
    for r in graded:
        grades.setdefault(json.dumps(r["prompt"]), {})[r["completion"][0]["content"]] = r["grade"]
    assert 0 < len(pairs) == sum(len(set(g.values())) > 1 for g in grades.values())  # a tie at every answer: none
    for pair in pairs:
        these = grades[json.dumps(pair["prompt"])]
        assert these[pair["chosen"][0]["content"]] == pair["chosen_grade"] == max(these.values())
        assert these[pair["rejected"][0]["content"]] == pair["rejected_grade"] == min(these.values())
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["grade_pairs"] == len(pairs)
    assert summary["grade_pairs_output"] == str(out.with_suffix(".pairs.jsonl"))
    dpo = run_script("dpo.py", "--preset", "tiny", "--dataset_id", str(out.with_suffix(".pairs.jsonl")), "--max_steps",
                     "1", "--output_dir", str(tmp_path))
    assert dpo["trainer"].state.global_step == 1
    # The same output without --grade_pairs: the earlier run's pairs (from those grades) went, not left as these.
    run_script("label.py", "--preset", "tiny", "--mode", "pointwise", "--judge", "python:alignkit.modeling.presets:score",
               "--output", str(out))
    assert not out.with_suffix(".pairs.jsonl").exists() and "grade_pairs" not in json.loads(
        out.with_suffix(".summary.json").read_text())
    with pytest.raises(ConfigError, match=r"--grade_pairs makes pairs from --mode pointwise's grades"):
        run_script("label.py", "--preset", "tiny", "--grade_pairs", "true", "--output", str(tmp_path / "p.jsonl"))


def test_a_reward_model_grades_each_answer_by_its_score(tiny_cache, tmp_path):
    """rm:RUN_FOLDER: the grade is the reward model's score of (prompt, answer), the label score >= 0 (default)."""
    from alignkit.feedback.rewards import RewardModel

    folder = run_script("reward.py", "--preset", "tiny", "--max_steps", "2", "--eval_split", "0", "--output_dir",
                        str(tmp_path), "--run_name", "rm")["run_folder"]
    out = tmp_path / "labels.jsonl"
    run_script("label.py", "--preset", "tiny", "--mode", "pointwise", "--judge", f"rm:{folder}", "--max_prompts", "8",
               "--output", str(out))
    labelled = rows(out)
    assert len(labelled) > 10 and all(r["label"] == (r["grade"] >= 0.0) for r in labelled)
    scores = RewardModel(str(folder))([r["prompt"] for r in labelled], [r["completion"][0]["content"] for r in labelled])
    assert [r["grade"] for r in labelled] == pytest.approx(scores, abs=1e-5)


def _answers(tmp_path: Path) -> None:
    lines = [{"prompt": f"question {i}", "response": f"answer {i}" + (" GOOD" if i % 2 == 0 else "")} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({**r, "response": r["response"] + " too"}) + "\n" for r in lines))


def test_an_llm_grades_each_answer_once_with_the_pointwise_template(tmp_path, alignkit_log):
    """Each answer graded once, cached with the judge's answer; one without a rating is kept (paid for) and shown,
    and only --retry_parse_failures true asks for it again (an audit: the flag was ignored in pointwise mode, and
    only the number was kept)."""
    _answers(tmp_path)
    rated = [False]

    def grader(body):
        text = body["messages"][-1]["content"]
        assert "[The Start of Assistant's Answer]" in text and "[[rating]]" in text  # FastChat's single-v1
        if "answer 1 too" in text:
            return "Rating: [[8]]" if rated[0] else "no rating here"
        return "Fine. Rating: [[9]]" if "GOOD" in text else "[[3]]"

    with FakeOpenAI(grader) as server:
        args = ["label.py", "--mode", "pointwise", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl",
                "--judge_base_url", server.base_url, "--judge_model", "fake", "--output", "labels.jsonl"]
        run_script(*args, cwd=tmp_path)
        assert server.count == 12  # 6 prompts x 2 sources, each graded once
        out = rows(tmp_path / "labels.jsonl")
        assert len(out) == 11  # the answer without a rating is not labelled
        assert all(r["label"] == ("GOOD" in r["completion"][0]["content"]) for r in out)
        summary = json.loads((tmp_path / "labels.summary.json").read_text())
        assert summary["parse_failures"] == 1 and summary["desirable"] == 6
        assert "1 graded answers hold no [[rating]], e.g. 'no rating here'" in alignkit_log.text
        cached = rows(tmp_path / "labels.cache" / "grades.jsonl")
        assert sorted(r.get("text") for r in cached).count("no rating here") == 1
        rated[0] = True  # the judge would answer now: a rerun still asks nothing again
        run_script(*args, cwd=tmp_path)
        assert server.count == 12 and rows(tmp_path / "labels.jsonl") == out
        assert "kept as parse failures (--retry_parse_failures true asks again" in alignkit_log.text
        run_script(*args, "--retry_parse_failures", "true", cwd=tmp_path)  # asks for that one answer again
        assert server.count == 13 and len(rows(tmp_path / "labels.jsonl")) == 12
        assert json.loads((tmp_path / "labels.summary.json").read_text())["parse_failures"] == 0


def test_a_pointwise_run_after_a_pairs_run_reuses_its_responses(tmp_path):
    """The README's order, label.py then label.py --mode pointwise: the second generated (with openai: generators,
    paid for) every answer again, its cache being labels.cache beside preferences.cache (found by an audit). The
    responses beside it are read: the same generator and prompt are the same key in every mode."""
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?"}) + "\n"
                                                    for i in range(4)))
    (tmp_path / "graders.py").write_text("def length(prompt, answer):\n    return len(answer)\n")
    with FakeOpenAI(lambda body: f"{body['model']} says {body['messages'][-1]['content']}") as server:
        common = ["--prompts", "prompts.jsonl", "--model_a", "openai:m", "--model_b", "openai:n",
                  "--generation_base_url", server.base_url]
        run_script("label.py", *common, "--judge", "python:alignkit.modeling.presets:rule_judge", "--output",
                   "out/preferences.jsonl", cwd=tmp_path)
        assert server.count == 8
        run_script("label.py", *common, "--mode", "pointwise", "--judge", f"python:{tmp_path / 'graders.py'}:length",
                   "--output", "out/labels.jsonl", cwd=tmp_path)
        assert server.count == 8  # nothing asked again
    assert len(rows(tmp_path / "out" / "labels.jsonl")) == 8
    # One source is enough to grade (each answer alone): it was refused with a message about pairs.
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "response": str(2 * i)})
                                                    + "\n" for i in range(4)))
    run_script("label.py", "--mode", "pointwise", "--responses_a", "answers.jsonl", "--judge",
               f"python:{tmp_path / 'graders.py'}:length", "--output", "one/labels.jsonl", cwd=tmp_path)
    assert len(rows(tmp_path / "one" / "labels.jsonl")) == 4


def test_a_python_grader_s_none_or_nan_is_no_grade(tmp_path, alignkit_log):
    """A grader returning None failed every request ("float() argument must be ... NoneType"), retried by every run;
    NaN counted as a low grade and inf as a high one, written as invalid JSON (found by an audit). Each is no grade:
    a parse failure, said once, as an LLM's answer without a rating."""
    _answers(tmp_path)
    (tmp_path / "graders.py").write_text(
        "import math\n\ndef odd(prompt, answer):\n"
        "    return None if 'answer 1' in answer else math.nan if 'answer 3' in answer else math.inf if 'answer 5' "
        "in answer else 8.0\n")
    run_script("label.py", "--mode", "pointwise", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge",
               f"python:{tmp_path / 'graders.py'}:odd", "--output", "labels.jsonl", cwd=tmp_path)
    summary = json.loads((tmp_path / "labels.summary.json").read_text())
    graded = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]  # strict JSON
    assert (summary["errors"], summary["parse_failures"], len(graded)) == (0, 6, 6)
    assert all(r["grade"] == 8.0 for r in graded)
    assert alignkit_log.text.count("which is no grade (counted as a parse failure)") == 1


def test_a_run_that_grades_no_answer_is_a_failed_run(tmp_path):
    """Every grade a parse failure ended with status 0, an empty output and "nothing to train on", where pairs mode
    fails in one line (the label.py audit of session 68): it fails as pairs mode does, naming the parse failures and
    the fix, its answers kept."""
    _answers(tmp_path)
    (tmp_path / "graders.py").write_text("def never(prompt, answer):\n    return None\n")
    args = ["label.py", "--mode", "pointwise", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl"]
    with pytest.raises(UserError, match=r"^no answer was labelled: the grader gave no grade to any of its 12 answers "
                                        r"\(they are in labels\.cache/grades\.jsonl\): a python: grader returns a "
                                        r"finite number or a bool; fix .*graders\.py:never, then run again$"):
        run_script(*args, "--judge", f"python:{tmp_path / 'graders.py'}:never", "--output", "labels.jsonl",
                   cwd=tmp_path)
    assert json.loads((tmp_path / "labels.summary.json").read_text())["parse_failures"] == 12
    with FakeOpenAI(lambda body: "I would not rate this.") as server:  # an LLM's: its fix, and the model in its rows
        with pytest.raises(UserError, match=r"^no answer was labelled: the grader gave no grade to any of its 12 "
                                            r"answers .*: an LLM grader writes its 1-10 rating as \[\[rating\]\].* "
                                            r"--retry_parse_failures true"):
            run_script(*args, "--judge_base_url", server.base_url, "--judge_model", "fake", "--output", "llm.jsonl",
                       cwd=tmp_path)
        assert server.count == 12


def test_an_llm_grader_s_rows_and_log_name_its_model(tmp_path, alignkit_log):
    """Pointwise rows recorded "grader": "openai", without the model, where pairs mode's rows record "judge":
    "openai:MODEL" (the label.py audit of session 68); its log line too."""
    _answers(tmp_path)
    with FakeOpenAI(lambda body: "Rating: [[8]]") as server:
        run_script("label.py", "--mode", "pointwise", "--responses_a", "a.jsonl", "--judge_base_url", server.base_url,
                   "--judge_model", "fake-grader", "--output", "labels.jsonl", cwd=tmp_path)
    assert {r["grader"] for r in rows(tmp_path / "labels.jsonl")} == {"openai:fake-grader"}
    assert "label: openai:fake-grader grades each answer (--mode pointwise)" in alignkit_log.text



def test_the_hint_to_train_on_unbalanced_labels_carries_the_desirable_weight_trl_advises(tmp_path, capsys):
    """Found by a kto.py audit: the closing line said `train on it: python kto.py --dataset_id labels.jsonl` whatever
    the balance, though TRL advises --desirable_weight W with W x desirable / undesirable in [1, 4/3]; labels of one
    class alone, which kto.py refuses, were handed to it too."""
    _answers(tmp_path)  # 12 answers, 6 of them GOOD
    (tmp_path / "graders.py").write_text("def good(prompt, answer):\n    return 'GOOD' in answer and '0' in answer\n")
    for name, grader in (("few.jsonl", "good"), ("all.jsonl", "alignkit.modeling.presets:score")):
        where = f"python:{tmp_path / 'graders.py'}:good" if grader == "good" else f"python:{grader}"
        run_script("label.py", "--mode", "pointwise", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl",
                   "--judge", where, "--output", name, "--grade_threshold", "1" if grader == "good" else "-1",
                   cwd=tmp_path)
    out = capsys.readouterr().out
    # 2 desirable, 10 undesirable: W = 5.8 puts the ratio mid-range (5.8 x 2 / 10 = 1.16, in [1, 4/3]).
    assert "train on it: python kto.py --dataset_id few.jsonl --desirable_weight 5.8\n" in out
    assert "not for kto.py yet: kto.py needs both labels, and all 12 answers are desirable: a higher " \
           "--grade_threshold splits them" in out and "--dataset_id all.jsonl" not in out
    from alignkit.feedback.pointwise import kto_next_step

    # The tiny preset's labels, 30:144 ([4.8, 6.4]): 5.6 keeps the 26:130 that train in range too (4.8 did not).
    assert kto_next_step(30, 144) == (" --desirable_weight 5.6", None) and 1 <= 5.6 * 26 / 130 <= 4 / 3
    assert kto_next_step(3, 7) == (" --desirable_weight 2.7", None)
    assert kto_next_step(12, 10) == kto_next_step(10, 10) == ("", None)  # 1.2 is in range: no flag
    assert kto_next_step(14, 10) == (" --desirable_weight 0.83", None)  # more desirable: W below 1
    for desirable, undesirable in ((1, 999), (7, 3), (999, 1), (5, 11)):
        weight = float(kto_next_step(desirable, undesirable)[0].split()[-1])
        assert 1 <= weight * desirable / undesirable <= 4 / 3, (desirable, undesirable)


@pytest.mark.parametrize("flags, message", [
    (["--judge", "python:alignkit.modeling.presets:rule_judge"], "must accept \\(prompt, answer\\)"),
    (["--judge", "openai", "--judge_template", "self_reference"], r"^--judge_template is read only in --mode pairs; "
     r"--mode pointwise grades each answer with FastChat's single-answer template, which takes no other template and "
     r"no principle: drop it$"),
    # --principle under the pointwise template (it said to pass --judge_template self_reference, which it refuses), and
    # an LLM's settings under a rule: ignored without a word (the label.py audit of session 68).
    (["--judge", "openai", "--principle", "Be brief"], r"^--principle is read only in --mode pairs; "),
    (["--judge", "python:alignkit.modeling.presets:score", "--judge_model", "gpt-4o", "--judge_max_tokens", "64"],
     r"^--judge_model is read only by --judge openai or hf, not by --judge "
     r"python:alignkit.modeling.presets:score, a function of the prompt and the answers: drop it, or judge with an "
     r"LLM \(--judge openai or hf\)$"),
])
def test_bad_graders_are_refused_before_any_work(tmp_path, flags, message):
    _answers(tmp_path)
    with pytest.raises(ConfigError, match=message):
        run_script("label.py", "--mode", "pointwise", "--responses_a", "a.jsonl", "--responses_b", "b.jsonl",
                   "--output", "labels.jsonl", *flags, cwd=tmp_path)
    assert not (tmp_path / "labels.jsonl").exists()


@pytest.mark.parametrize("text", [
    "Format is [[rating]], e.g. Rating: [[5]]. My rating: [[9]]", "Rating: [[3]]. Turn 2: Rating: [[8]]",
    "Rating: [[0]]", "Rating: [[11]]", "Rating: [8]", "Rating: [[8.]]", "Rating: [[7.5]]", "seven", "",
])
def test_the_rating_is_read_as_fastchat_reads_it(text):
    """FastChat's run_judge_single: the first [[x]], else the first [x], any number; -1 (here None) without one.
    alignkit took the last match, had no [x] fallback and refused "8." (label.py and rl.py alike)."""
    import ast
    import re

    from alignkit.evals import fastchat_compat
    from alignkit.train.rl_rewards import parse_rating as rl_rating

    common, _ = fastchat_compat.load()  # FastChat's llm_judge/common.py (its optional API clients stubbed)
    match = re.search(common.one_score_pattern, text) or re.search(common.one_score_pattern_backup, text)
    fastchat = float(ast.literal_eval(match.groups()[0])) if match else None
    assert parse_rating(text) == fastchat
    assert rl_rating(text) == (fastchat if fastchat is not None and 1 <= fastchat <= 10 else None)  # its scale only
    assert parse_rating(None) is None
