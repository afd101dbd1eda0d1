"""rlaif.py: every round writes preferences, an adapter and an evaluation; a stop between rounds resumes at the next.

The rounds run label.py, dpo.py and evaluate.py as subprocesses on the tiny preset, rule-judged (offline);
a small prompt subset keeps it to about a minute.
"""

from __future__ import annotations

import json

from conftest import run_script

FAST = ["--max_prompts", "12", "--num_samples", "4"]


def test_rounds_write_adapters_and_evaluations_and_resume_at_the_next_round(sft_run, tmp_path):
    args = ["--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--output_dir", str(tmp_path), *FAST]
    first = run_script("rlaif.py", *args, "--rounds", "1")  # the process ends between round 1 and round 2
    folder = first["folder"]
    round_1 = folder / "round-1"
    stamps = {p: p.stat().st_mtime_ns for p in round_1.rglob("*") if p.is_file()}
    assert (round_1 / "round.json").is_file() and not (folder / "round-2").exists()

    second = run_script("rlaif.py", *args, "--rounds", "2")
    assert {p: p.stat().st_mtime_ns for p in round_1.rglob("*") if p.is_file()} == stamps  # round 1 not redone
    records = second["records"]
    assert [r["round"] for r in records] == [1, 2]
    for r, record in enumerate(records, 1):
        here = folder / f"round-{r}"
        adapter = json.loads((here / "dpo" / "adapter_config.json").read_text())
        # Each round trains on top of the previous round's policy.
        started = sft_run["run_folder"] if r == 1 else folder / "round-1" / "dpo"
        assert (here / "dpo" / adapter["base_model_name_or_path"]).resolve() == started.resolve()  # relative, or absolute
        results = json.loads((here / "eval" / "results.json").read_text())
        assert {results["pairs"][0]["model"], results["pairs"][0]["opponent"]} == {f"round-{r}", "previous"}
        assert 0 <= record["win_rate"] <= 1 and record["win"] + record["loss"] + record["tie"] > 0
        assert record["pairs"] > 0
    table = (folder / "rlaif.md").read_text()
    assert "| 1 |" in table and "| 2 |" in table
    assert (folder / "win_rate.png").read_bytes()[:4] == b"\x89PNG"


def test_the_judge_endpoint_group_reaches_label_and_evaluate_whole():
    """rlaif.py composes the judge endpoint group once and hands every field of it to label.py and evaluate.py,
    which compose the same group: a round's judge calls run with the settings given to rlaif.py."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings, PairwiseSettings, RLAIFSettings
    from alignkit.train.rlaif import endpoint_flags

    s = RLAIFSettings(judge_model="judge-x", judge_base_url="http://127.0.0.1:9/v1", parallel=3, max_retries=1,
                      request_timeout=7.0, judge_api_key_env="MY_KEY")
    label = parse_config(LabelSettings, ["--prompts", "p.jsonl", *endpoint_flags(s)], env_file=None)
    pairwise = parse_config(PairwiseSettings, ["--models", "a=x", "b=y", "--prompts_file", "q.jsonl", "--judge_model", "eval-judge",
                                               *endpoint_flags(s, skip={"judge_model"})], env_file=None)
    for parsed in (label, pairwise):
        assert (parsed.judge_base_url, parsed.parallel, parsed.max_retries, parsed.request_timeout,
                parsed.judge_api_key_env) == ("http://127.0.0.1:9/v1", 3, 1, 7.0, "MY_KEY")
    assert label.judge_model == "judge-x" and pairwise.judge_model == "eval-judge"  # --eval_judge_model's place
