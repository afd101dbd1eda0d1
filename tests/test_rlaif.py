"""rlaif.py: every round writes preferences, an adapter and an evaluation; a stop between rounds resumes at the next.

The rounds run label.py, dpo.py and evaluate.py as subprocesses on the tiny preset, rule-judged (offline): the
README's three rounds (conftest.rlaif_rounds, also its command's test in tests/test_readme.py), the rest faked.
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
from pathlib import Path

import pytest

from conftest import run_script

JUDGE = 'def {name}(prompt, a, b):\n    return "A" if len(a) >= len(b) else "B"\n'


@pytest.fixture(autouse=True)
def judge_modules(tmp_path, monkeypatch):
    """The python: judges the rounds below name (my_judge:judge, other_judge:judge, j:f), importable: a round's
    label step keys on their code."""
    import sys

    code = tmp_path / "judges"
    code.mkdir()
    for module, name in (("my_judge", "judge"), ("other_judge", "judge"), ("j", "f"), ("unparsed_judge", "judge"),
                         ("flaky_judge", "judge")):
        (code / f"{module}.py").write_text(JUDGE.format(name=name))
        monkeypatch.delitem(sys.modules, module, raising=False)
    # Not syspath_prepend: it calls pkg_resources, which alignkit's alpaca_eval stand-in may be by now.
    monkeypatch.setattr(sys, "path", [str(code), *sys.path])
    return code


def test_rounds_write_adapters_and_evaluations_and_resume_at_the_next_round(rlaif_rounds):
    """The README's `rlaif.py --preset tiny --model_id runs/tiny-sft --rounds 3` after the same command with
    `--rounds 1` (conftest.rlaif_rounds: the README's rounds, trained once for tests/test_readme.py and here): the
    first process ends between round 1 and round 2, the README's resumes at round 2 and runs rounds 2 and 3."""
    folder, stamps, second = rlaif_rounds["folder"], rlaif_rounds["round_1_stamps"], rlaif_rounds["second"]
    round_1 = folder / "round-1"
    # After the first process (the stamps are its files): round 1 whole, no round 2.
    assert round_1 / "round.json" in stamps and not rlaif_rounds["round_2_after_first"]

    evals = round_1 / "dpo" / "alignkit_evals.json"  # round 2's evaluation adds round 1's side of their match
    shown = (evals, round_1 / "dpo" / "README.md")  # kept, and shown on round 1's card
    assert {p: p.stat().st_mtime_ns for p in round_1.rglob("*") if p.is_file() and p not in shown} == \
        {p: stamp for p, stamp in stamps.items() if p not in shown}  # round 1 not redone
    assert "pairwise vs round-2" in json.dumps(evals.read_text()) and "vs round-2" in shown[1].read_text()
    assert set(json.loads(evals.read_text())) == {"pairwise vs previous", "pairwise vs round-2"}
    records = second["records"]
    assert [r["round"] for r in records] == [1, 2, 3]
    for r, record in enumerate(records, 1):
        here = folder / f"round-{r}"
        adapter = json.loads((here / "dpo" / "adapter_config.json").read_text())
        # Each round trains on top of the previous round's policy.
        started = rlaif_rounds["project"] / "runs" / "tiny-sft" if r == 1 else folder / f"round-{r - 1}" / "dpo"
        assert (here / "dpo" / adapter["base_model_name_or_path"]).resolve() == started.resolve()  # relative, or absolute
        results = json.loads((here / "eval" / "results.json").read_text())
        assert {results["pairs"][0]["model"], results["pairs"][0]["opponent"]} == {f"round-{r}", "previous"}
        assert 0 <= record["win_rate"] <= 1 and record["win"] + record["loss"] + record["tie"] > 0
        assert record["pairs"] > 0
    # Round 2's previous policy is round 1's new one: its answers are round 1's, not generated again.
    def turns(path):
        return {row["question_id"]: row["choices"][0]["turns"] for row in map(json.loads, path.open())}

    made = folder / "round-1" / "eval" / "model_answer" / "round-1.jsonl"
    reused = folder / "round-2" / "eval" / "model_answer" / "previous.jsonl"
    assert turns(reused) == turns(made) and turns(made)
    # (as written: under the README's relative --output_dir, from the project root it ran in)
    assert {(rlaif_rounds["project"] / json.loads(line)["reused_from"]).resolve() for line in reused.open()} == \
        {made.resolve()}
    table = (folder / "rlaif.md").read_text()
    assert "| 1 |" in table and "| 2 |" in table and "| 3 |" in table
    assert (folder / "win_rate.png").read_bytes()[:4] == b"\x89PNG"


def test_the_judge_endpoint_group_reaches_label_and_evaluate_whole():
    """rlaif.py composes the judge endpoint group once and hands every field of it to label.py and evaluate.py,
    which compose the same group: a round's judge calls run with the settings given to rlaif.py."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings, PairwiseSettings, RLAIFSettings
    from alignkit.train.rlaif import endpoint_flags, label_judge_flags

    s = RLAIFSettings(judge_model="judge-x", judge_base_url="http://127.0.0.1:9/v1", parallel=3, max_retries=1,
                      request_timeout=7.0, judge_api_key_env="MY_KEY")
    label = parse_config(LabelSettings, ["--prompts", "p.jsonl", *endpoint_flags(s)], env_file=None)
    pairwise = parse_config(PairwiseSettings, ["--models", "a=x", "b=y", "--prompts_file", "q.jsonl", "--judge_model", "eval-judge",
                                               *endpoint_flags(s, skip={"judge_model"})], env_file=None)
    for parsed in (label, pairwise):
        assert (parsed.judge_base_url, parsed.parallel, parsed.max_retries, parsed.request_timeout,
                parsed.judge_api_key_env) == ("http://127.0.0.1:9/v1", 3, 1, 7.0, "MY_KEY")
    assert label.judge_model == "judge-x" and pairwise.judge_model == "eval-judge"  # --eval_judge_model's place
    # A judge that asks no endpoint is given its threads only (the logged label.py command named an API key).
    for judge in ("python:alignkit.modeling.presets:score", "rm:runs/tiny-reward"):
        s.judge = judge
        assert label_judge_flags(s) == ["--parallel", "3"]
    s.judge = "hf"  # a local judge: no endpoint's URL or key, which label.py refuses for it (an evaluation judge's)
    assert label_judge_flags(s) == endpoint_flags(s, skip={"judge_base_url", "judge_api_key_env"})
    assert parse_config(LabelSettings, ["--prompts", "p.jsonl", "--judge", "hf", *label_judge_flags(s)],
                        env_file=None).judge_base_url is None
    s.judge = "openai"
    assert label_judge_flags(s) == endpoint_flags(s)


def test_a_label_step_s_inputs_leave_out_the_endpoint_settings_its_judge_is_not_given(monkeypatch):
    """The label step's inputs held every endpoint setting, though an hf or python: judge is not given them
    (label_judge_flags): changing the evaluation judge's endpoint relabeled every round. An openai judge's still count."""
    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif_inputs

    monkeypatch.setattr(rlaif_inputs, "_model", lambda source, revision=None: source)
    for judge, moves in (("python:alignkit.modeling.presets:score", False), ("hf", False), ("openai", True)):
        s = RLAIFSettings(judge=judge, dataset_id="hub/prompts", judge_model="m", judge_base_url="http://127.0.0.1:9/v1")
        before = rlaif_inputs._label_inputs(s, 0, "policy", None)
        s.judge_base_url = "http://127.0.0.1:8/v1"  # the evaluation endpoint moves
        assert (rlaif_inputs._label_inputs(s, 0, "policy", None) != before) is moves, judge


def _fake_steps(calls: list):
    """rlaif's three scripts, faked: each writes what the real one leaves, and its output says what it was made
    from."""
    from pathlib import Path

    import yaml

    from alignkit.evals.results import save_json

    def run(script, args, log):
        flag = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
        calls.append((script, flag.get("--output") or flag.get("--output_dir")))
        if script == "label.py":
            out = Path(flag["--output"])
            out.write_text(json.dumps({"judge": flag["--judge"], "policy": flag["--model_id"]}) + "\n")
            unparsed = "unparsed" in flag["--judge"]  # a judge whose every verdict fails to parse labels nothing
            out.write_text("" if unparsed else out.read_text())
            # A flaky judge: 2 requests failed after their retries in its first run, none in the next.
            once = out.parent.parent / "flaky-judge-failed"
            failed = 2 if "flaky" in flag["--judge"] and not once.exists() else 0
            once.touch()
            out.with_suffix(".summary.json").write_text(json.dumps(
                {"pairs_judged": 3, "labeled": 0, "parse_failures": 3} if unparsed else {"pairs_judged": 1,
                                                                                     "labeled": 1,
                                                                                     "judgments": {"failed": failed}}))
        elif script == "dpo.py":
            dpo = Path(flag["--output_dir"]) / flag["--run_name"]
            dpo.mkdir(exist_ok=True)
            beta = yaml.safe_load(Path(flag["--config"]).read_text())["dpo_beta"]
            trained = Path(flag["--dataset_id"]).read_text() + f"beta {beta}"
            (dpo / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": flag["--model_id"]}))
            (dpo / "adapter_model.safetensors").write_text(trained)
            (dpo / "metrics.json").write_text("{}")
        else:
            r, adapter = args[args.index("--models") + 2].split("=", 1)
            # evaluate.py keeps each model's answers and refuses those of another model as loaded (mtbench).
            answers = Path(flag["--output_dir"]) / "model_answer" / f"{r}.jsonl"
            made_by = (Path(adapter) / "adapter_model.safetensors").read_text()
            if answers.exists() and answers.read_text() != made_by:
                raise RuntimeError(f"{answers}: this answer was generated by another model as loaded")
            answers.parent.mkdir(parents=True, exist_ok=True)
            answers.write_text(made_by)
            overall = {"adjusted_win_rate": 0.75, "ci95": [0.5, 1.0], "win": 3, "loss": 1, "tie": 0}
            save_json([{"model": r, "opponent": "previous", "overall": overall}],
                      Path(flag["--output_dir"]) / "results.json")

    return run


def _faked_rounds(tmp_path, monkeypatch):
    """(a base folder, a prompts file, the steps' calls) for rounds whose three scripts are faked (_fake_steps)."""
    from alignkit.train import rlaif

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    base, prompts = tmp_path / "base", tmp_path / "prompts.jsonl"
    base.mkdir()
    (base / "config.json").write_text("{}")
    prompts.write_text('{"prompt": "hi"}\n')
    calls = []
    monkeypatch.setattr(rlaif, "_run", _fake_steps(calls))
    return base, prompts, calls


def _one_faked_round(tmp_path, monkeypatch, judge: str):
    """(settings of one rlaif round judged by `judge`, the steps' calls), its three scripts faked (_fake_steps)."""
    from alignkit.core.config import RLAIFSettings

    base, prompts, calls = _faked_rounds(tmp_path, monkeypatch)
    return RLAIFSettings(model_id=str(base), dataset_id=str(prompts), judge=judge, eval_judge_model="rule",
                         rounds=1, output_dir=str(tmp_path)), calls


def test_a_rerun_redoes_exactly_the_steps_whose_inputs_changed_and_keeps_the_earlier_results(
        tmp_path, monkeypatch, alignkit_log, judge_modules):
    """A round is reused because it was made from the same inputs, not because its files exist: a new --dpo_beta
    retrains round 1's adapter (its labels stand), which changes round 1's evaluation and round 2's policy, so
    round 2 is redone whole; a new --judge relabels. The earlier results move aside, and one line says why."""
    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif

    base, prompts, calls = _faked_rounds(tmp_path, monkeypatch)
    folder = tmp_path / "run"

    def run(**changes):
        calls.clear()
        s = RLAIFSettings(**{"model_id": str(base), "dataset_id": str(prompts), "judge": "python:my_judge:judge",
                             "eval_judge_model": "rule", "rounds": 2, "output_dir": str(tmp_path), **changes})
        return rlaif.run(s, folder)

    first = run()
    everything = [(step, f"{folder}/round-{r}{where}") for r in (1, 2) for step, where in
                  (("label.py", "/preferences.jsonl"), ("dpo.py", ""), ("evaluate.py", "/eval"))]
    assert calls == everything
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("round-*/**/*") if p.is_file()}
    assert run() == first and calls == []  # the same inputs: nothing redone, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A notebook's settings cell run again with another run_name, then the Rounds cell alone: the old folder's rounds
    # were redone under the new settings, its record kept the old ones.
    from alignkit.core.errors import UserError

    with pytest.raises(UserError, match=r"^these settings name another run folder than .*run \(run_name changed "
                                        r"since the 'Run folder' cell ran\): run the cells from 'Run folder' on again"):
        run(run_name="elsewhere")
    with pytest.raises(UserError, match=r"\(model_id changed since"):  # no run_name: the folder is named by it
        run(model_id=str(tmp_path / "other-base"))
    assert calls == [] and json.loads((folder / "rlaif_config.json").read_text())["dpo_beta"] == 0.1
    assert run(output_dir=f"{tmp_path}/./") == first and calls == []  # the same folder, however it is spelled

    alignkit_log.clear()
    run(dpo_beta=0.3)
    assert calls == everything[1:]  # round 1's labels stand; everything after its adapter is redone
    assert "round 1: label made earlier from the same inputs; reused" in alignkit_log.text  # said, not left unsaid
    assert "round 1: dpo redone: dpo_beta changed (the earlier results: " in alignkit_log.text
    assert "round 1: eval redone: adapter changed" in alignkit_log.text
    assert "round 2: label redone: policy changed" in alignkit_log.text
    aside = next((folder / "round-1").glob("previous-*"))
    assert json.loads((aside / "dpo.step.json").read_text())["inputs"]["dpo_beta"] == 0.1
    assert (aside / "round.json").is_file() and (aside / "eval" / "results.json").is_file()
    # The whole eval folder went aside: the earlier adapter's answers with it (left in place, evaluate.py refused
    # them on every rerun: the round could never finish).
    assert (aside / "eval" / "model_answer" / "round-1.jsonl").read_text().endswith("beta 0.1")
    earlier = next((folder / "round-1").glob("dpo.previous-*"))  # beside dpo/: its relative base path still holds
    assert (earlier / "adapter_model.safetensors").read_text().endswith("beta 0.1")
    assert json.loads((folder / "round-1" / "dpo.step.json").read_text())["inputs"]["dpo_beta"] == 0.3
    assert json.loads((folder / "rlaif_config.json").read_text())["dpo_beta"] == 0.3  # what the rounds ran under

    calls.clear()
    run(dpo_beta=0.3, judge="python:other_judge:judge")
    assert calls[0] == ("label.py", f"{folder}/round-1/preferences.jsonl") and len(calls) == 6
    assert json.loads((folder / "round-1" / "preferences.jsonl").read_text())["judge"] == "python:other_judge:judge"

    (folder / "round-2" / "eval" / "results.json").write_text('{"pairs": [{"mod')  # torn by a kill mid-write
    run(dpo_beta=0.3, judge="python:other_judge:judge")
    assert calls == [("evaluate.py", f"{folder}/round-2/eval")]  # redone, not read (nor skipped)

    # The judge's code edited in place (same module name): its verdicts would differ, so the labels are redone;
    # they were reused by name, and the adapter trained on the old verdicts kept.
    alignkit_log.clear()
    (judge_modules / "other_judge.py").write_text(JUDGE.format(name="judge").replace(">=", "<"))
    run(dpo_beta=0.3, judge="python:other_judge:judge")
    assert calls == [("label.py", f"{folder}/round-{r}/preferences.jsonl") for r in (1, 2)]  # (the fake's labels
    assert "round 1: label redone: judge changed" in alignkit_log.text  # are the same: the adapters stand)
    assert set(first[0]["steps"]) == {"label", "dpo", "eval"}  # round.json: the digest of each step's inputs
    # A file passed through --label_args (the answering model's chat template) counts by its content: edited in
    # place, it relabels (it was keyed by the flags' text alone).
    template = tmp_path / "chat_template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    more = {"dpo_beta": 0.3, "judge": "python:other_judge:judge", "label_args": f"--chat_template {template}"}
    run(**more)
    assert run(**more) and calls == []
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    alignkit_log.clear()
    run(**more)
    assert calls == [("label.py", f"{folder}/round-{r}/preferences.jsonl") for r in (1, 2)]
    assert "round 1: label redone: label_args_files changed" in alignkit_log.text
    more["label_args"] = f"--chat_template={template}"  # the flag=value form: the same file, by content
    run(**more)
    template.write_text("{% for m in messages %}{{ m['role'] }}> {{ m['content'] }}{% endfor %}")
    alignkit_log.clear()
    run(**more)
    assert calls == [("label.py", f"{folder}/round-{r}/preferences.jsonl") for r in (1, 2)]
    assert "round 1: label redone: label_args_files changed" in alignkit_log.text
    # The judge's file named by another spelling of its path (./, an absolute path) is the same judge: nothing is
    # redone (an audit: the whole round was labelled, trained and judged again for the judge's path as typed).
    monkeypatch.chdir(judge_modules)
    (judge_modules / "two.py").write_text(JUDGE.format(name="judge") + JUDGE.format(name="other"))
    run(**{**more, "judge": "python:two.py:judge"})
    for spelling in ("./two.py", f"{judge_modules}/two.py", f"{judge_modules}/../{judge_modules.name}/two.py"):
        assert run(**{**more, "judge": f"python:{spelling}:judge"}) and calls == [], spelling
    run(**{**more, "judge": "python:./two.py:other"})  # another function of that file: another judge
    assert calls[0] == ("label.py", f"{folder}/round-1/preferences.jsonl")


def test_each_step_run_heads_its_part_of_the_log_and_a_redone_step_s_part_goes_aside_with_its_results(
        tmp_path, monkeypatch):
    """round-r/log.txt held the first run's label, dpo and eval output and, straight after, a rerun's redone DPO's,
    with nothing to tell them apart; and the redo moved the earlier results to previous-TIME/ but not their log. Each
    step run's part starts with a line naming its time, step and command; a redone step's earlier parts move with its
    results (the steps reused keep theirs)."""
    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif, step_process

    real = rlaif._run
    base, prompts, calls = _faked_rounds(tmp_path, monkeypatch)
    fake = rlaif._run
    for script in ("label.py", "dpo.py", "evaluate.py"):  # each prints a line, then the fake leaves its files
        (tmp_path / script).write_text(f"import os\nprint('{script} output', os.getpid())\n")
    monkeypatch.setattr(step_process, "ROOT", tmp_path)
    monkeypatch.setattr(step_process, "live", lambda: False)
    monkeypatch.setattr(rlaif, "_run", lambda script, args, log: (real(script, args, log), fake(script, args, log)))
    folder = tmp_path / "run"

    def run(**changes):
        rlaif.run(RLAIFSettings(**{"model_id": str(base), "dataset_id": str(prompts), "judge": "python:j:f",
                                   "eval_judge_model": "rule", "rounds": 1, **changes}), folder)
        return (folder / "round-1" / "log.txt").read_text().splitlines()

    first = run()
    assert [line.split(": ", 1)[0][24:] for line in first if line.startswith("=== ")] == ["label", "dpo", "eval"]
    header = next(line for line in first if line.startswith("=== ") and " dpo: " in line)
    assert re.fullmatch(r"=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d dpo: dpo\.py --config \S+/round-1/dpo_config.yaml "
                        r"--model_id .*", header), header
    second = run(dpo_beta=0.3)
    aside = next((folder / "round-1").glob("previous-*"))
    label = first[:first.index(next(line for line in first if " dpo: " in line))]
    assert second[:len(label)] == label  # the labels stand: their part stays
    assert [line.split(": ", 1)[0][24:] for line in second if line.startswith("=== ")] == ["label", "dpo", "eval"]
    assert "--resume false" in next(line for line in second if " dpo: " in line)
    assert (aside / "log.txt").read_text().splitlines() == first[len(label):]  # the earlier dpo's and eval's, in order


def test_the_table_names_what_made_it_and_round_folders_of_an_earlier_longer_run(tmp_path, monkeypatch,
                                                                                 alignkit_log):
    """rlaif.md's rows said nothing of the settings that made them (only rlaif_config.json did); and after --rounds 1
    over an earlier --rounds 2, it showed round 1 alone while round-2/ stayed with no word."""
    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif

    base, prompts, calls = _faked_rounds(tmp_path, monkeypatch)

    def run(rounds):
        rlaif.run(RLAIFSettings(model_id=str(base), dataset_id=str(prompts), judge="python:j:f", rounds=rounds,
                                eval_judge_model="rule", dpo_beta=0.2), tmp_path / "run")
        return (tmp_path / "run" / "rlaif.md").read_text()

    table = run(2)
    assert f"Model {base}, judge python:j:f, evaluation judge rule, dpo_beta 0.2, reference previous, 2 rounds; every " \
           "setting: rlaif_config.json." in table and "earlier run" not in table
    table = run(1)
    note = "round-2/ is from an earlier run with more rounds, not this one (--rounds 1): not in this table"
    assert "| 1 |" in table and "| 2 |" not in table and ", 1 round;" in table
    assert table.endswith(f"\n{note}.\n") and note in alignkit_log.text


def test_a_round_that_labels_nothing_stops_at_its_judge_and_a_missing_prompts_file_before_round_1(
        tmp_path, monkeypatch, judge_modules):
    """A judge whose verdicts never parsed let label.py end well with an empty file; rlaif.py counted the step done
    and dpo.py stopped on "preferences.jsonl: no usable rows ... Point it at a file with data rows", a file rlaif.py
    writes, and so did every rerun. And a --dataset_id that is not there was found by round 1's label.py, after the
    policy had loaded."""
    from alignkit.core.data_files import DataError
    from alignkit.core.errors import UserError
    from alignkit.train import rlaif

    s, calls = _one_faked_round(tmp_path, monkeypatch, "python:unparsed_judge:judge")
    for _ in range(2):  # the rerun asks label.py again (a fixed judge is another judge): not counted done
        calls.clear()
        with pytest.raises(UserError, match=r"^round 1: no pair was labeled: 3 answers without a verdict \(see "
                                            r".*round-1/preferences.summary.json\); check what the judge answers.*; "
                                            r"then run the same rlaif.py command again"):
            rlaif.run(s, tmp_path / "run")
        assert [script for script, _ in calls] == ["label.py"]
    calls.clear()
    missing = dataclasses.replace(s, dataset_id=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        rlaif.run(missing, tmp_path / "run-missing")
    assert calls == []


def test_a_round_whose_judge_requests_failed_stops_and_the_rerun_asks_for_them_before_dpo(
        tmp_path, monkeypatch, judge_modules):
    """Judge requests that failed after their retries (429s, 500s): the round trained DPO on the pairs that made it
    and counted its label step done, so no rerun asked for the rest (the README says a rerun does). The round stops
    before DPO in one line; the same command runs label.py again (asking only those: its cache), then goes on."""
    from alignkit.core.errors import UserError
    from alignkit.train import rlaif

    s, calls = _one_faked_round(tmp_path, monkeypatch, "python:flaky_judge:judge")
    with pytest.raises(UserError, match=r"^round 1: 2 requests failed after their retries \(see .*\), so "
                                        r"preferences.jsonl lacks their pairs: run the same rlaif.py command again, "
                                        r"which asks only for those"):
        rlaif.run(s, tmp_path / "run")
    assert [script for script, _ in calls] == ["label.py"]
    calls.clear()
    rlaif.run(s, tmp_path / "run")
    assert [script for script, _ in calls] == ["label.py", "dpo.py", "evaluate.py"]


def test_a_redo_that_fails_keeps_the_earlier_round_aside_and_the_same_command_resumes_it(tmp_path, monkeypatch):
    """A step redone from new inputs moves the earlier results aside first; if it fails, the rerun resumes it (by
    the step's own rules: no --resume false again) instead of starting it over or reading the earlier results."""
    import pytest

    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    base, prompts = tmp_path / "base", tmp_path / "prompts.jsonl"
    base.mkdir()
    (base / "config.json").write_text("{}")
    prompts.write_text('{"prompt": "hi"}\n')
    calls, runs, fail = [], [], []
    fake = _fake_steps(calls)

    def run_step(script, args, log):
        runs.append((script, args))
        if script in fail:
            raise RuntimeError(f"{script} failed")
        fake(script, args, log)

    monkeypatch.setattr(rlaif, "_run", run_step)
    folder = tmp_path / "run"

    def run(**changes):
        runs.clear()
        return rlaif.run(RLAIFSettings(**{"model_id": str(base), "dataset_id": str(prompts), "judge": "python:j:f",
                                          "eval_judge_model": "rule", "rounds": 1, **changes}), folder)

    first = run()
    fail.append("dpo.py")
    with pytest.raises(RuntimeError, match="dpo.py failed"):
        run(dpo_beta=0.3)
    assert [script for script, _ in runs] == ["dpo.py"] and runs[0][1][-2:] == ["--resume", "false"]
    here = folder / "round-1"
    assert not (here / "round.json").exists()  # the round is unfinished: nothing reads the earlier one as its result
    aside = next(here.glob("previous-*"))
    assert json.loads((aside / "round.json").read_text()) == first[0]
    fail.clear()
    again = run(dpo_beta=0.3)
    assert [script for script, _ in runs] == ["dpo.py", "evaluate.py"] and "--resume" not in runs[0][1]
    assert again[0]["steps"]["label"] == first[0]["steps"]["label"]  # its labels stood throughout
    assert json.loads((aside / "round.json").read_text()) == first[0]


def test_a_step_that_goes_on_says_so_as_a_reused_or_redone_one_does(tmp_path, monkeypatch, alignkit_log):
    """A round's dpo.py interrupted after checkpoint-75 was resumed with only its bare command printed: "resuming
    from checkpoint-75" was in log.txt alone. A step that goes on says how far it came; one that ran to its end but
    was not recorded done (killed between the two) says it is finishing."""
    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif

    base, prompts, calls = _faked_rounds(tmp_path, monkeypatch)
    fake, cut = rlaif._run, []

    def run_step(script, args, log):
        if script in cut:
            checkpoint = Path(args[args.index("--output_dir") + 1]) / "dpo" / "checkpoint-75"
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "trainer_state.json").write_text("{}")
            raise KeyboardInterrupt
        fake(script, args, log)

    monkeypatch.setattr(rlaif, "_run", run_step)
    s = RLAIFSettings(model_id=str(base), dataset_id=str(prompts), judge="python:j:f", eval_judge_model="rule",
                      rounds=1)
    cut.append("dpo.py")
    with pytest.raises(KeyboardInterrupt):
        rlaif.run(s, tmp_path / "run")
    cut.clear()
    alignkit_log.clear()
    rlaif.run(s, tmp_path / "run")
    assert "round 1: dpo resumed (from its checkpoint at step 75)" in alignkit_log.text
    assert "round 1: label made earlier from the same inputs; reused" in alignkit_log.text
    here = tmp_path / "run" / "round-1"
    for step in ("dpo", "label"):  # killed after the step's end, before its marker said done
        marker = here / f"{step}.step.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "done": False}))
    alignkit_log.clear()
    rlaif.run(s, tmp_path / "run")
    for step in ("label", "dpo"):
        assert f"round 1: {step} run again to check what it made (its run ended before it was recorded as done)" \
            in alignkit_log.text


def test_the_policy_samples_trains_and_is_judged_as_loaded_the_same_way(tmp_path, monkeypatch):
    """The loader settings (--dtype, --chat_template, ...) reach label.py and evaluate.py as well as dpo.py, each
    parsed by the script's own settings; --revision and --gguf_file name the starting model in every round-1
    script (evaluate.py as ID@REVISION) and no later policy, a run folder that records its base. Before, label.py
    and evaluate.py sampled the policy at their defaults: at main, in another dtype, under the model's own template."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import DPOSettings, LabelSettings, PairwiseSettings, RLAIFSettings
    from alignkit.core.groups import loader_settings
    from alignkit.evals.named_models import parse_models
    from alignkit.train import rlaif, rlaif_inputs

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    prompts, template = tmp_path / "prompts.jsonl", tmp_path / "chat.jinja"
    prompts.write_text('{"prompt": "hi"}\n')
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    calls, fake = [], _fake_steps([])
    monkeypatch.setattr(rlaif, "_run", lambda script, args, log: (calls.append((script, args)), fake(script, args, log)))
    s = RLAIFSettings(model_id="org/model", revision="v1", dataset_id=str(prompts), judge="python:my_judge:judge",
                      eval_judge_model="rule", rounds=2, output_dir=str(tmp_path), dtype="bf16",
                      chat_template=str(template), attn_implementation="eager", trust_remote_code=True,
                      chat_template_kwargs={"enable_thinking": False})
    rlaif.run(s, tmp_path / "run")
    parsed = []
    for script, args in calls:
        if script == "label.py":
            parsed.append(parse_config(LabelSettings, args, env_file=None))
            loaded = parsed[-1]
        elif script == "dpo.py":
            parsed.append(parse_config(DPOSettings, args, env_file=None))
            loaded = parsed[-1]
        else:
            parsed.append(parse_config(PairwiseSettings, args[1:], env_file=None))  # after the command
            loaded = loader_settings(parsed[-1], parse_models(parsed[-1].models)["previous"])
        first = len(parsed) <= 3
        assert (loaded.model_id, loaded.revision) == (("org/model", "v1") if first else
                                                      (str(tmp_path / "run" / "round-1" / "dpo"), None)), script
        assert (loaded.dtype, loaded.chat_template, loaded.attn_implementation, loaded.trust_remote_code) == \
            ("bf16", str(template), "eager", True), script
        if script != "dpo.py":  # --chat_template_kwargs: the policy samples and answers so (label.py's rows carry it)
            assert parsed[-1].chat_template_kwargs == {"enable_thinking": False}, script
    assert [script for script, _ in calls] == ["label.py", "dpo.py", "evaluate.py"] * 2
    calls.clear()
    rlaif.run(dataclasses.replace(s, chat_template_kwargs={"enable_thinking": True}), tmp_path / "run")
    assert [script for script, _ in calls] == ["label.py", "dpo.py", "evaluate.py"] * 2  # every step redone
    calls.clear()
    rlaif.run(s, tmp_path / "run")  # back as it was: its steps are redone from these inputs

    calls.clear()
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    rlaif.run(s, tmp_path / "run")  # the template is part of every step's inputs, by its text
    assert [script for script, _ in calls] == ["label.py", "dpo.py", "evaluate.py"] * 2

    gguf = tmp_path / "gguf"
    gguf.mkdir()
    s = RLAIFSettings(model_id=str(gguf), gguf_file="model.Q4_0.gguf", dataset_id=str(prompts))
    assert rlaif.start_model(s) == str(gguf / "model.Q4_0.gguf")  # one name every script loads without the flag
    assert "gguf_file" not in rlaif_inputs._dpo_values(s) and rlaif.revision_of(s, rlaif.start_model(s)) is None


def test_a_step_stops_when_rlaif_is_killed(tmp_path):
    """rlaif.py killed (SIGKILL, SIGTERM) left its dpo.py running: a rerun then started a second dpo.py in the
    same run folder, both writing checkpoints. A step now gets a SIGTERM when rlaif.py dies."""
    import subprocess
    import sys

    from conftest import outlives_its_parent

    (tmp_path / "step.py").write_text("import os, pathlib, sys, time\n"
                                      "pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\ntime.sleep(60)\n")
    pid_file = tmp_path / "step.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys\nfrom alignkit.train import rlaif, step_process\n"
        f"step_process.ROOT = pathlib.Path({str(tmp_path)!r})\n"
        f"rlaif._run('step.py', [{str(pid_file)!r}], pathlib.Path({str(tmp_path / 'log.txt')!r}))\n")])
    assert not outlives_its_parent(parent, pid_file), "the step outlived rlaif.py"


def test_a_step_s_output_and_bars_are_shown_as_they_come_and_logged_as_lines(tmp_path, monkeypatch, capsys):
    """rlaif.py's steps wrote only to their log: a notebook cell (or terminal) watched hours of rounds with one
    command line per step. Where a person watches, the step draws its bars and they are shown as they come; the log
    keeps each line's last state. An interrupt stops the step before it is raised."""
    import os
    import time

    from alignkit.train import step_process

    log = _fake_step(tmp_path, monkeypatch, live=True, code=(
        "import os, sys, time\n"
        "print('bars', os.environ.get('ALIGNKIT_PROGRESS'), flush=True)\n"
        "for i in range(3):\n    sys.stderr.write(f'\\rjudging {i}/2'); sys.stderr.flush(); time.sleep(0.05)\n"
        "sys.stderr.write('\\n'); print('done', flush=True)\n"))
    step_process.run_step("step.py", [], log)
    shown = capsys.readouterr().err
    from alignkit.core.args import parse_config
    from alignkit.core.config import SFTSettings

    monkeypatch.setenv("ALIGNKIT_PROGRESS", "1")  # what a step gets: no unknown setting to the scripts (it was)
    parse_config(SFTSettings, env_file=None, args=[])
    monkeypatch.delenv("ALIGNKIT_PROGRESS")
    assert "bars 1" in shown and "\rjudging 0/2\rjudging 1/2\rjudging 2/2\n" in shown and "done" in shown
    assert re.fullmatch(r"=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d step: step\.py ", log.read_text().splitlines()[0])
    assert _body(log) == ["bars 1", "judging 2/2", "done"]
    monkeypatch.setattr(step_process, "live", lambda: False)  # a batch job: the log only, no bars drawn
    step_process.run_step("step.py", [], log)
    assert "bars" not in capsys.readouterr().err and _body(log)[3:] == ["bars None", "judging 2/2", "done"]
    # A step that exits leaving a process holding its output (wandb's service, a server) ends the step there; a
    # Windows line end is a line end.
    (tmp_path / "leaves.py").write_text("import subprocess, sys\nsys.stdout.write('left\\r\\n'); sys.stdout.flush()\n"
                                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n")
    monkeypatch.setattr(step_process, "RELAY_GRACE_S", 0.5)
    started = time.monotonic()
    step_process.run_step("leaves.py", [], log)
    assert time.monotonic() - started < 15 and _body(log)[6:] == ["left"]

    (tmp_path / "slow.py").write_text("import os, pathlib, sys, time\n"
                                      "pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\ntime.sleep(60)\n")
    pid_file = tmp_path / "slow.pid"

    import subprocess

    class Interrupted(subprocess.Popen):  # Ctrl-C (a notebook's interrupt) while the step runs
        def wait(self, timeout=None):
            if timeout is None and not getattr(self, "interrupted", False):
                self.interrupted = True
                while not (pid_file.is_file() and pid_file.read_text()):
                    time.sleep(0.05)
                raise KeyboardInterrupt
            return super().wait(timeout)

    monkeypatch.setattr(subprocess, "Popen", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        step_process.run_step("slow.py", [str(pid_file)], log)
    with pytest.raises(ProcessLookupError):  # stopped and reaped before the interrupt went on
        os.kill(int(pid_file.read_text()), 0)


def _fake_step(tmp_path: Path, monkeypatch, live: bool, code: str) -> Path:
    """A step of `code`, step.py in tmp_path, where run_step (and rlaif._run) finds its scripts (step_process.ROOT);
    `live`: a person watches (its bars drawn and shown) or not. Returns the log for it to write, log.txt."""
    from alignkit.train import step_process

    (tmp_path / "step.py").write_text(code)
    monkeypatch.setattr(step_process, "ROOT", tmp_path)
    monkeypatch.setattr(step_process, "live", lambda: live)
    return tmp_path / "log.txt"


def _body(log: Path) -> list[str]:
    """A step log's lines but each run's header (step_process.HEADER)."""
    return [line for line in log.read_text().splitlines() if not line.startswith("=== ")]


def _capture_steps(monkeypatch):
    """rlaif's steps faked, each call's flags kept: [(script, {flag: value}, prompts file evaluate.py got)]."""
    from alignkit.train import rlaif

    calls, fake = [], _fake_steps([])

    def run(script, args, log):
        flags = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
        seen = Path(flags["--prompts_file"]).read_text() if "--prompts_file" in flags else None
        calls.append((script, flags, seen))
        fake(script, args, log)

    monkeypatch.setattr(rlaif, "_run", run)
    return calls


def test_a_step_s_prints_come_in_order_and_a_late_writer_breaks_nothing(tmp_path, monkeypatch):
    """Into a pipe, a step's stdout was block-buffered where PYTHONUNBUFFERED is not set (a user's shell; the test
    environment sets it): its print()s came at its exit, after all its log lines, on screen and in the log. And a
    process the step left behind writing after the grace hit the closed log: the relay thread died with a traceback
    under the next step's output (found by an audit)."""
    import threading
    import time

    from alignkit.train import step_process

    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    monkeypatch.setattr(step_process, "ROOT", tmp_path)
    monkeypatch.setattr(step_process, "live", lambda: False)
    (tmp_path / "step.py").write_text("import sys\nprint('1 stdout')\nsys.stderr.write('2 stderr\\n')\n"
                                      "print('3 stdout')\nsys.stderr.write('4 stderr\\n')\n")
    log = tmp_path / "step.log"
    step_process.run_step("step.py", [], log)
    assert _body(log) == ["1 stdout", "2 stderr", "3 stdout", "4 stderr"]

    monkeypatch.setattr(step_process, "RELAY_GRACE_S", 0.5)
    (tmp_path / "leaves.py").write_text(
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5); "
        "print(\"late\", flush=True); time.sleep(0.5); print(\"later\", flush=True)'])\nprint('done', flush=True)\n")
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    step_process.run_step("leaves.py", [], log)
    time.sleep(3)
    assert not errors and _body(log)[4:] == ["done"]


def test_a_hub_style_dataset_is_labelled_from_its_split_and_judged_on_its_held_out_prompts(tmp_path, monkeypatch):
    """label.py read a dataset with splits from "train" (ultrafeedback_binarized, the default, has none: round 1
    failed), and a Hub dataset, a CSV or rows of messages as the evaluation prompts were refused before round 1.
    Now the prompts are labelled from --dataset_split, and each round is judged on the held-out split's prompts
    (train_prefs: test_prefs), written once to eval_prompts.jsonl in the run folder."""
    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif

    from datasets import Dataset, DatasetDict

    def rows(*texts):
        return Dataset.from_list([{"prompt": t, "messages": [{"role": "user", "content": t}]} for t in texts])

    data = tmp_path / "uf"  # ultrafeedback_binarized's splits, saved as a Hub dataset is loaded
    DatasetDict({"train_prefs": rows("train one", "train two"),
                 "test_prefs": rows("held out one", "held out two", "held out one", "held out three"),
                 }).save_to_disk(str(data))
    calls = _capture_steps(monkeypatch)
    s = RLAIFSettings(model_id=str(tmp_path), dataset_id=str(data), judge="python:j:f", rounds=1,
                      eval_judge_model="rule", eval_max_prompts=2)
    rlaif.run(s, tmp_path / "run")
    label = next(flags for script, flags, _ in calls if script == "label.py")
    assert label["--prompts"] == str(data) and label["--prompts_split"] == "train_prefs"
    _, flags, seen = next(c for c in calls if c[0] == "evaluate.py")
    assert flags["--prompts_file"] == str(tmp_path / "run" / "eval_prompts.jsonl")
    assert [json.loads(line) for line in seen.splitlines()] == [
        {"question_id": 1, "prompt": "held out one"}, {"question_id": 2, "prompt": "held out two"}]

    calls.clear()  # another split and column: a message list per row, read as label.py reads --prompt_field
    s = RLAIFSettings(model_id=str(tmp_path), dataset_id=str(data), judge="python:j:f", rounds=1,
                      eval_judge_model="rule", eval_prompts_split="train_prefs", prompt_field="messages")
    rlaif.run(s, tmp_path / "run2")
    assert next(f for c, f, _ in calls if c == "label.py")["--prompt_field"] == "messages"
    assert [json.loads(line)["prompt"] for line in next(p for c, _, p in calls if c == "evaluate.py").splitlines()] \
        == ["train one", "train two"]


def test_evaluation_prompts_are_read_in_any_format_and_refused_before_round_1_where_they_cannot_be_judged(
        tmp_path, monkeypatch):
    from alignkit.core.config import RLAIFSettings
    from alignkit.core.errors import UserError
    from alignkit.train import rlaif

    calls = _capture_steps(monkeypatch)
    table = tmp_path / "prompts.csv"
    table.write_text("prompt\nhi\nname three fruits.\n")
    s = RLAIFSettings(model_id=str(tmp_path), dataset_id=str(table), judge="python:j:f", rounds=1,
                      eval_judge_model="rule")
    rlaif.run(s, tmp_path / "run")
    assert "--prompts_split" not in next(f for c, f, _ in calls if c == "label.py")  # one file: no splits
    assert next(p for c, _, p in calls if c == "evaluate.py").splitlines() == [
        '{"question_id": 1, "prompt": "hi"}', '{"question_id": 2, "prompt": "name three fruits."}']

    lines = tmp_path / "eval.jsonl"  # what evaluate.py reads goes as it is
    lines.write_text('{"prompt": "hi", "category": "greeting"}\n')
    calls.clear()
    rlaif.run(RLAIFSettings(model_id=str(tmp_path), dataset_id=str(table), eval_prompts=str(lines), rounds=1,
                            judge="python:j:f", eval_judge_model="rule"), tmp_path / "run3")
    assert next(f for c, f, _ in calls if c == "evaluate.py")["--prompts_file"] == str(lines)

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}) + "\n")
    data = tmp_path / "splits"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "hi"}\n')
    calls.clear()
    for source, split, message in [
            (chats, None, rf"^{re.escape(str(chats))}: row 2: a prompt of 2 turns \(system, user\); each round's "
                          r"evaluation \(evaluate.py pairwise\) judges one-turn prompts\. Pass --eval_prompts"),
            (data, None, r"^the evaluation prompts \(--eval_prompts_split test\): .*: no split 'test'; .* split\(s\) "
                         r"train\. Pass one of them"),
            (data, "dev", r"^the evaluation prompts \(--eval_prompts_split dev\): .*no split 'dev'")]:
        s = RLAIFSettings(model_id=str(tmp_path), dataset_id=str(data), eval_prompts=str(source), rounds=1,
                          dataset_split="train", eval_prompts_split=split, judge="python:j:f")
        with pytest.raises(UserError, match=message):
            rlaif.run(s, tmp_path / "run4")
    assert calls == []  # refused before round 1's labelling


def test_each_round_judges_each_distinct_evaluation_prompt_once(tmp_path, monkeypatch, alignkit_log):
    """The tiny preset's prompts file (64 rows, 29 distinct prompts) went to evaluate.py as it is: each round judged
    "64 matches", a repeated prompt as often as it repeats, and the bootstrap CI counted the repeats as independent
    questions (an audit). Each distinct prompt is judged once (its first row's id and category), and the line says
    how many were dropped, as evaluate.py's vibes does; a file without repeats still goes as it is."""
    from alignkit.core.config import RLAIFSettings
    from alignkit.train import rlaif

    calls = _capture_steps(monkeypatch)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "hi", "category": "greeting"}, {"prompt": "name a fruit."}, {"prompt": "hi", "category": "other"},
        {"prompt": "name a fruit."}, {"prompt": "count to 3."}]))
    rlaif.run(RLAIFSettings(model_id=str(tmp_path), dataset_id=str(prompts), judge="python:j:f", rounds=1,
                            eval_judge_model="rule"), tmp_path / "run")
    _, flags, seen = next(c for c in calls if c[0] == "evaluate.py")
    assert flags["--prompts_file"] == str(tmp_path / "run" / "eval_prompts.jsonl")
    assert [json.loads(line) for line in seen.splitlines()] == [
        {"question_id": 1, "category": "greeting", "prompt": "hi"},
        {"question_id": 2, "category": "prompts", "prompt": "name a fruit."},
        {"question_id": 5, "category": "prompts", "prompt": "count to 3."}]
    assert f"each round is judged on 3 prompts from {prompts} (2 repeated ones dropped), in " in alignkit_log.text
    assert rlaif.eval_prompts(RLAIFSettings(dataset_id=str(prompts)), None) is None  # the check writes nothing
    once = tmp_path / "once.txt"
    once.write_text("hi\nname a fruit.\n")
    assert rlaif.eval_prompts(RLAIFSettings(dataset_id=str(prompts), eval_prompts=str(once)), tmp_path) == str(once)


def test_a_step_interrupted_leaves_the_saying_to_rlaif(tmp_path):
    """A round's script interrupted printed the command line's advice ("the same command goes on") beside rlaif's own
    line, in a notebook too: as a step, it stops with the same exit status and says nothing."""
    import subprocess
    import sys

    from alignkit.core.errors import EXIT_INTERRUPTED, INTERRUPTED, STEP_OF

    script = "from alignkit.core.errors import report_user_errors\nreport_user_errors()\nraise KeyboardInterrupt\n"
    env = {k: v for k, v in os.environ.items() if k != STEP_OF}
    alone = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    step = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**env, STEP_OF: "1"})
    assert alone.returncode == step.returncode == EXIT_INTERRUPTED
    assert alone.stderr.strip() == INTERRUPTED and step.stderr.strip() == ""


def test_a_step_s_own_how_to_go_on_names_rlaif_s_command_not_the_step_s(tmp_path, monkeypatch):
    """An interrupted round's dpo.py said "its checkpoints stay in ...: run the same command again to resume", where
    the command rlaif.py had printed for it ended in --resume false: run again, it would start over. As a step, its
    line names how to go on where rlaif runs (the rlaif.py command, or a notebook's cells)."""
    from alignkit.core import errors
    from alignkit.train import rlaif

    log = _fake_step(tmp_path, monkeypatch, live=False, code=(
        "import pathlib, sys\nfrom alignkit.train.run_release import _release\n"
        "folder = pathlib.Path(sys.argv[1])\n(folder / 'checkpoint-75').mkdir(parents=True, exist_ok=True)\n"
        "(folder / 'checkpoint-75' / 'trainer_state.json').write_text('{}')\n"
        "_release(folder, None, KeyboardInterrupt())\n"))
    for notebook, again in ((False, "run the same rlaif.py command again"),
                            (True, "run the cells from the settings cell on again")):
        monkeypatch.setattr(errors, "is_notebook", lambda: notebook)
        rlaif._run("step.py", [str(tmp_path / "dpo")], log)
        said = log.read_text().splitlines()[-1]
        assert said.endswith(f"its checkpoints stay in {tmp_path / 'dpo'} (see alignkit_failed.txt): {again} to "
                             "resume"), said
    monkeypatch.delenv(errors.STEP_AGAIN, raising=False)  # alone, a script's own command is the one to run again
    monkeypatch.setenv(errors.STEP_OF, "command")
    monkeypatch.setattr(errors, "is_notebook", lambda: False)
    assert errors.run_again() == "run the same command again"
    # What rlaif sets for its steps is no setting: a step's settings did not take ALIGNKIT_STEP_AGAIN for a typo
    from alignkit.core.environment import stray_variables

    monkeypatch.setenv(errors.STEP_AGAIN, "run the same rlaif.py command again")
    assert stray_variables([], set(), None) == []


def test_a_step_s_stop_lines_name_rlaif_s_command_not_the_same_command(monkeypatch):
    """Inside a round, label.py's and evaluate.py's stops (a judge server down: its first failures, a silent
    endpoint, an output of no row) said "then run the same command again", where the command rlaif.py had printed
    for the step ends in --resume false. Under STEP_AGAIN they name how to go on where rlaif runs; alone, a
    script's own command, as before."""
    from alignkit.core import errors, llm
    from alignkit.feedback.label_records import refuse_empty
    from alignkit.train.rl_rewards import reward_raised

    class Silent(Exception):
        pass

    def said() -> list[str]:
        def silent():
            with llm.silence_said(Silent):
                raise Silent("no answer in 30s")

        def first_failures():
            watch = llm.FirstFailures("judge request", "Check the judge server", total=None)
            for _ in range(llm.FIRST_FAILURES):
                watch.failed(RuntimeError("connection refused"))

        lines = []
        for stop in (silent, first_failures, lambda: refuse_empty(0, {"judge call": 4}, "Check the judge server")):
            with pytest.raises(errors.UserError) as stopped:
                stop()
            lines.append(str(stopped.value))
        return lines + [str(reward_raised("python:r.py:f", len, ValueError("bad")))]

    monkeypatch.setattr(errors, "is_notebook", lambda: False)
    monkeypatch.setenv(errors.STEP_OF, "command")
    monkeypatch.setenv(errors.STEP_AGAIN, "run the same rlaif.py command again")
    for line in said():
        assert "then run the same rlaif.py command again (" in line and "same command" not in line, line
    monkeypatch.delenv(errors.STEP_AGAIN)
    for line in said():
        assert "then run the same command again (" in line, line


def test_a_sigterm_as_a_step_s_training_ended_names_rlaif_s_command_not_the_same_command(monkeypatch, tmp_path):
    """A SIGTERM after the last step of a round's dpo.py: the finished run is saved, then it stops with a line that
    said "the same command merges, pushes and reports it", where the step's command ends in --resume false. Under
    STEP_AGAIN it names how to go on where rlaif runs (run_again()); alone, the script's own command, as before."""
    import types

    from alignkit.core import errors
    from alignkit.core.config import DPOSettings
    from alignkit.train import cell_checks, training

    # finish() up to the stop, on a rank other than the main one (it writes nothing): the run trained here and
    # finished (its metrics.json read back), its weights gathered.
    monkeypatch.setattr(cell_checks, "check_trainer_folder", lambda trainer, folder: None)
    monkeypatch.setattr(training, "check_trained", lambda folder, s: None)
    monkeypatch.setattr(training, "gathered_state_dict", lambda trainer: None)
    (tmp_path / "metrics.json").write_text("{}")
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(is_main_process=False), steps_at_start=3,
                                    state=types.SimpleNamespace(global_step=3), sigterm_everywhere=lambda: True)
    s = DPOSettings(model_id="tiny", dataset_id="org/pairs", output_dir=str(tmp_path), run_name="dpo")

    def said() -> str:
        monkeypatch.setitem(errors._SIGTERM, "stopping", False)  # put back after: stop_for_sigterm sets it
        with pytest.raises(errors.Terminated) as stopped:
            training.finish(trainer, None, s, tmp_path, "dpo")
        return str(stopped.value)

    monkeypatch.setattr(errors, "is_notebook", lambda: False)
    monkeypatch.setenv(errors.STEP_OF, "command")
    monkeypatch.setenv(errors.STEP_AGAIN, "run the same rlaif.py command again")
    assert said() == (f"SIGTERM as the training ended: the run is saved in {tmp_path}; run the same rlaif.py command "
                      "again to go on from it")
    monkeypatch.delenv(errors.STEP_AGAIN)
    assert said() == (f"SIGTERM as the training ended: the run is saved in {tmp_path}; the same command merges, "
                      "pushes and reports it")


def test_a_reward_model_judge_is_the_same_step_input_wherever_its_folder_is(tiny_cache, tmp_path):
    """rm:FOLDER in a round's inputs by the model's content: a copied folder, or its path spelled another way, is the
    same judge (the round was relabelled, retrained and judged again); retrained, it is another."""
    import shutil

    from alignkit.modeling import presets
    from alignkit.train.rlaif_inputs import _judge, same_inputs

    shutil.copytree(presets.paths()["model"], tmp_path / "rm")
    shutil.copytree(tmp_path / "rm", tmp_path / "copy")
    first = {"judge": _judge(f"rm:{tmp_path / 'rm'}"), "seed": 1}
    assert first["judge"][0] == f"rm:{tmp_path / 'rm'}"  # the form rounds recorded: they stand
    for spelling in (tmp_path / "copy", f"{tmp_path}/./rm"):
        assert same_inputs(first, {"judge": _judge(f"rm:{spelling}"), "seed": 1}), spelling
    assert not same_inputs(first, {"judge": _judge(f"rm:{tmp_path / 'copy'}"), "seed": 2})
    (tmp_path / "copy" / "config.json").write_text((tmp_path / "copy" / "config.json").read_text() + " ")
    assert not same_inputs(first, {"judge": _judge(f"rm:{tmp_path / 'copy'}"), "seed": 1})  # another model now


def test_what_dpo_refuses_on_a_mixture_of_experts_is_refused_before_round_1_samples(tmp_path, monkeypatch):
    """An MoE policy with alignkit's default --lora_dropout 0.05 (PEFT takes no dropout on the fused experts it
    adapts) sampled and labeled round 1, then its dpo.py step refused (the rlaif audit of session 30). Refused before
    round 1, through an adapter over the model too; --lora_dropout 0 goes on."""
    from transformers import AutoConfig

    from alignkit.core.errors import UserError
    from alignkit.train import rlaif

    s, calls = _one_faked_round(tmp_path, monkeypatch, "python:unparsed_judge:judge")
    AutoConfig.for_model("mixtral", num_local_experts=4, num_experts_per_tok=2).save_pretrained(s.model_id)
    adapter = tmp_path / "sft-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": s.model_id,
                                                             "peft_type": "LORA"}))
    for policy in (s.model_id, str(adapter)):
        with pytest.raises(UserError, match=r"^--lora_dropout 0.05 on \S+ \(mixtral, a mixture of experts\): .*pass "
                                            r"--lora_dropout 0"):
            rlaif.run(dataclasses.replace(s, model_id=policy), tmp_path / "run")
        assert calls == []
    with pytest.raises(UserError, match=r"^round 1: no pair was labeled"):  # past the check: round 1's label.py
        rlaif.run(dataclasses.replace(s, lora_dropout=0.0), tmp_path / "run")
    assert [script for script, _ in calls] == ["label.py"]


def test_what_round_1_s_steps_would_refuse_is_refused_by_the_settings_before_any_folder(tiny_cache, tmp_path):
    """A typo in --evaluate_args was found by round 1's evaluate.py after its labelling and DPO (hours on a real
    model); a bad --label_args, a mistyped --model_id, a --prompt_field the prompts lack and a bad --judge by round
    1's label.py; and each refused try left a run folder behind (the rlaif notebook audit of session 58). Each
    step's command line as the round builds it is parsed by the step's own settings in the settings cell, which
    refuses in one line before anything is written."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import RLAIFSettings
    from alignkit.core.errors import UserError
    from alignkit.modeling import presets
    from alignkit.train import rlaif

    model = str(presets.paths()["model"])
    s = parse_config(RLAIFSettings, ["--preset", "tiny", "--model_id", model, "--max_prompts", "8", "--num_samples",
                                     "4", "--rounds", "1"], presets={"tiny": presets.defaults("rlaif")}, env_file=None)
    rlaif.check(s)  # the tiny round as it runs
    columns = tmp_path / "questions.jsonl"
    columns.write_text('{"question": "hi"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"\n')
    for change, message in [
            ({"evaluate_args": "--judge_modell rule"}, r"^round 1's evaluate.py would refuse its settings: unknown "
             r"setting: --judge_modell \(in --evaluate_args; did you mean --judge_model\?\)\. python evaluate.py "
             r"pairwise --help lists every setting"),
            ({"label_args": "--bogus_flag 3"}, r"^round 1's label.py would refuse its settings: unknown setting: "
             r"--bogus_flag \(in --label_args\)"),
            ({"label_args": "--num_samples many"}, r"^round 1's label.py would refuse its settings: .*num_samples"),
            ({"model_id": "runs/tiny-sftt"}, r"^model not found: runs/tiny-sftt is no local folder"),
            ({"prompt_field": "question"}, r"prompts.jsonl: no column 'question' \(columns: prompt, category\)\. Pass "
             r"--prompt_field"),
            ({"dataset_id": str(columns)}, r"questions.jsonl: no column 'prompt' \(columns: question\)"),
            ({"judge": "nonsense"}, r"^--judge 'nonsense': expected openai, hf, rm:RUN_FOLDER, or python:"),
            ({"eval_prompts": str(tmp_path / "nothere.jsonl")}, r"nothere.jsonl: file not found"),
            # A file that cannot be read, before the judge's key is asked for (it was reported once the key was set)
            ({"dataset_id": str(bad), "judge": "openai", "judge_model": "gpt-4o", "judge_api_key_env":
              "ALIGNKIT_TEST_NO_KEY"}, r"bad\.jsonl: line 2: invalid JSON")]:
        with pytest.raises(UserError, match=message):
            rlaif.check(dataclasses.replace(s, **change))

    # The script: refused in its settings cell, no run folder left behind.
    runs = tmp_path / "runs"
    for flags in (["--evaluate_args", "--judge_modell rule"], ["--model_id", "runs/tiny-sftt"]):
        with pytest.raises(UserError):
            run_script("rlaif.py", "--preset", "tiny", "--model_id", model, "--output_dir", str(runs), *flags,
                       cwd=tmp_path)
        assert not runs.exists()


def test_the_steps_checks_say_nothing_of_the_environment_rlaif_py_named(tiny_cache, monkeypatch, alignkit_log):
    """With the judge model in the environment alone, rlaif.py said "settings from the environment: judge_model",
    then each step's check (the command lines rlaif.py builds pass it as --judge_model) "none used; set again by the
    command line" twice and "not read by this script: ALIGNKIT_JUDGE_MODEL" (dpo.py's): the environment unused and
    a command line nobody typed. rlaif.py's own line stays; a step's process still says its own, in its log."""
    from pathlib import Path

    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings, RLAIFSettings
    from alignkit.modeling import presets
    from alignkit.train import rlaif
    from alignkit.train.rlaif_inputs import label_command

    monkeypatch.setenv("ALIGNKIT_JUDGE_MODEL", "fake")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    s = parse_config(RLAIFSettings, ["--preset", "tiny", "--model_id", str(presets.paths()["model"]), "--rounds", "2",
                                     "--judge", "openai", "--judge_base_url", "http://127.0.0.1:9/v1"],
                     presets={"tiny": presets.defaults("rlaif")}, env_file=None)
    rlaif.check(s)
    said = alignkit_log.text
    assert said.count("settings from the environment") == 1, said
    assert "settings from the environment: judge_model (ALIGNKIT_JUDGE_MODEL)" in said
    assert "set again by the command line" not in said and "not read by this script" not in said
    alignkit_log.clear()  # label.py itself, as round 1 runs it: its own line, as before
    parse_config(LabelSettings, label_command(s, 1, s.model_id, None, Path("preferences.jsonl")),
                 presets=presets.named("label"), env_file=None)
    assert "set again by the command line, whose value is used: judge_model (ALIGNKIT_JUDGE_MODEL)" in alignkit_log.text


def test_the_evaluation_prompts_are_said_once_though_read_by_the_check_and_the_run(tiny_cache, tmp_path,
                                                                                    alignkit_log):
    """Every rlaif run said "4 prompts from .../prompts.jsonl" for the evaluation prompts twice (check() reads them,
    then run() again to write them) before "each round is judged on 4 prompts": that line says them, once; the
    prompts round 1 labels are said once too."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import RLAIFSettings
    from alignkit.modeling import presets
    from alignkit.train import rlaif

    s = parse_config(RLAIFSettings, ["--preset", "tiny", "--model_id", str(presets.paths()["model"]), "--max_prompts",
                                     "4", "--eval_max_prompts", "4"], presets={"tiny": presets.defaults("rlaif")},
                     env_file=None)
    rlaif.check(s)
    rlaif.eval_prompts(s, tmp_path)
    said = [r.getMessage() for r in alignkit_log.records]
    assert len([m for m in said if m.startswith("4 prompts from ")]) == 1, said  # the labelled ones
    assert len([m for m in said if m.startswith("each round is judged on 4 prompts from ")]) == 1, said


def test_a_step_s_refusal_is_said_once_with_how_to_go_on_where_rlaif_runs(tmp_path, monkeypatch, capsys):
    """A failing step's `error:` line was shown, then rlaif's own line said it again with its log; and in a
    notebook that line said to run "the same rlaif.py command" (there is none): one line, in the words of where
    rlaif runs (the rlaif notebook audit of session 58)."""
    from alignkit.core import errors
    from alignkit.core.errors import UserError
    from alignkit.train import rlaif, step_process

    log = _fake_step(tmp_path, monkeypatch, live=True, code=(
        "import sys\nprint('working', flush=True)\nsys.stderr.write('error: bad flag')\n"
        "sys.stderr.flush()\nsys.stderr.write('\\n')\nsys.exit(2)\n"))
    for notebook, again in ((False, "run the same rlaif.py command again"),
                            (True, "run the cells from the settings cell on again")):
        monkeypatch.setattr(errors, "is_notebook", lambda: notebook)
        with pytest.raises(UserError, match=rf"^step.py stopped: bad flag \(its log: .*\)\. Fix that and {again}: it "
                                            r"resumes at this round$"):
            rlaif._run("step.py", [], log)
        shown = capsys.readouterr().err
        assert "working" in shown and "bad flag" not in shown  # the raised line says it
    assert log.read_text().count("error: bad flag\n") == 2  # the log keeps it
    # A step whose error: line is followed by a crash (exit 1, a long traceback at shutdown) still says it, hidden
    # from the screen as it is; and a retry that exits 2 without one does not pass on an earlier try's (the review of
    # session 33: the whole appended log was searched).
    (tmp_path / "step.py").write_text("import sys\nsys.stderr.write('error: the real reason\\n')\n"
                                      "print('\\n'.join(f'teardown {i}' for i in range(40)))\nsys.exit(1)\n")
    with pytest.raises(RuntimeError, match=r"^step.py failed \(exit 1\): the real reason; its log: "):
        rlaif._run("step.py", [], log)
    # A refusal that embeds another's text of several lines (an endpoint's body) is one error: line, passed on whole:
    # its later lines were shown on the screen and cut from the raised line (the close of session 33).
    (tmp_path / "step.py").write_text("from alignkit.core.errors import UserError, report_user_errors\n"
                                      "report_user_errors()\nraise UserError('the judge failed (body: {\\n  \"detail\": "
                                      "\"model not found\"\\n}): fix --judge_model')\n")
    with pytest.raises(UserError, match=r'^step.py stopped: the judge failed \(body: \{ "detail": "model not found" '
                                        r'\}\): fix --judge_model \(its log'):
        rlaif._run("step.py", [], log)
    assert "model not found" not in capsys.readouterr().err  # said once, by the raised line
    (tmp_path / "step.py").write_text("import sys\nprint('usage: step.py [-h]')\nsys.exit(2)\n")
    with pytest.raises(UserError, match=r"^step.py stopped: see the log \(its log"):
        rlaif._run("step.py", [], log)
    screen = step_process._Screen(__import__("io").StringIO())  # a line held back only while it could be one
    for piece in ("err", "ands\n", "\rerror: x", "\n", "e"):
        screen.write(piece)
    screen.close()
    assert screen.stream.getvalue() == "errands\n\re"
