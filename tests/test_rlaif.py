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
