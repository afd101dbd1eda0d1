"""Bad inputs to label.py, rl.py and reward.py get one line naming the file, row and field, and the fix, instead of
a silent wrong result: a split asked of a single prompts file, margins written as text (a CSV's only kind of cell)
and their row numbers past a blank line, a responses file none of whose prompts is one to label, and a prompt
given two different responses. The functions are called in-process: nothing is trained or generated."""

import csv
import json
from collections import Counter
from types import SimpleNamespace

import pytest

from alignkit.core.args import ConfigError
from alignkit.core.data import DataError

PROMPTS = ["name three fruits.", "name three animals.", "name three colors.", "name three tools."]


def jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def label_settings(**values):
    """What label.py's prompt and response readers take of its settings."""
    base = dict(prompts=None, prompts_split="train", prompts_config=None, prompt_field="prompt", max_prompts=None,
                responses_a=None, responses_b=None, response_field="auto")
    return SimpleNamespace(**{**base, **values})


# ---------------------------------------------------------------- a split of a single file
def test_label_refuses_a_split_of_a_single_prompts_file(tmp_path):
    from alignkit.feedback.labeling import load_prompts

    path = jsonl(tmp_path / "lp.jsonl", [{"prompt": p} for p in PROMPTS])
    run = SimpleNamespace(stats=Counter(), settings=label_settings(prompts=path, prompts_split="test"))
    with pytest.raises(ConfigError) as err:
        load_prompts(run)
    assert str(err.value) == (
        f"--prompts_split test: {path} is a single file, which has no splits (the whole file is the prompts). Drop "
        "--prompts_split, or pass a folder or Hub dataset that has a test split")
    run.settings.prompts_split = "train"
    assert [p.messages[0]["content"] for p in load_prompts(run)] == PROMPTS


def test_label_refuses_a_split_of_the_responses_file_it_reads_prompts_from(tmp_path):
    from alignkit.feedback.labeling import load_prompts

    path = jsonl(tmp_path / "ra.jsonl", [{"prompt": p, "response": "x"} for p in PROMPTS])
    run = SimpleNamespace(stats=Counter(), settings=label_settings(responses_a=path, prompts_split="test"))
    with pytest.raises(ConfigError, match=rf"^--prompts_split test: {path} is a single file, which has no splits"):
        load_prompts(run)


def test_rl_refuses_a_split_of_a_single_prompts_file(tmp_path):
    from alignkit.core.config import RLSettings
    from alignkit.train.rl import load_prompt_dataset

    path = jsonl(tmp_path / "rlp.jsonl", [{"question": p} for p in PROMPTS])
    with pytest.raises(ConfigError) as err:
        load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=path, prompt_field="question", dataset_split="test"))
    assert str(err.value) == (
        f"--dataset_split test: {path} is a single file, which has no splits (the whole file is the training data). "
        "Drop --dataset_split, or pass a folder or Hub dataset that has a test split")
    # The default split names the default Hub dataset's: a file read under it is the whole file, as before.
    data = load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=path, prompt_field="question"))
    assert [row["prompt"][0]["content"] for row in data] == PROMPTS


# ---------------------------------------------------------------- margins
def write_csv(path, margins):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected", "margin"])
        writer.writerows([f"q{i}", "a", "b", m] for i, m in enumerate(margins))
    return str(path)


def test_csv_margins_parse_and_text_that_is_no_number_is_refused(tmp_path):
    from alignkit.train.reward import margins

    assert margins(write_csv(tmp_path / "m.csv", ["1.5", " 2 ", "-0.25"])) == [1.5, 2.0, -0.25]
    bad = write_csv(tmp_path / "bad.csv", ["1.5", "high"])
    with pytest.raises(DataError) as err:
        margins(bad)
    assert str(err.value) == (f"{bad}: row 3: field 'margin': expected a number (--use_margin reads it), got 'high'. "
                              "Fix the row, or pass --use_margin false")  # a CSV row by its line (the header's is 1)
    with pytest.raises(DataError, match=r"bad.csv: row 2: field 'margin': expected a number .* got 'nan'"):
        margins(write_csv(tmp_path / "bad.csv", ["nan"]))


def test_margin_error_names_the_line_past_a_blank_one(tmp_path):
    from alignkit.train.reward import margins

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "3", "score_rejected": 1},
            {"prompt": "q", "chosen": "c", "rejected": "d", "score_chosen": None, "score_rejected": 1}]
    path = jsonl(tmp_path / "m.jsonl", rows, blank_after=1)
    with pytest.raises(DataError) as err:
        margins(path)
    assert str(err.value) == (f"{path}: row 3: field 'score_chosen': expected a number (--use_margin reads it), got "
                              "None. Fix the row, or pass --use_margin false")
    assert margins(jsonl(tmp_path / "ok.jsonl", rows[:1], blank_after=0)) == [2.0]
    # label.py --grade_pairs' pairs carry their grades (the reward audit of session 30: --use_margin refused them)
    graded = [{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_grade": 9, "rejected_grade": 3.5}]
    assert margins(jsonl(tmp_path / "graded.jsonl", graded, blank_after=0)) == [5.5]


# ---------------------------------------------------------------- responses files
def file_run(tmp_path, responses_b, **values):
    """label.py's run as collect_responses reads it, with two responses files and the prompts of lp.jsonl."""
    from alignkit.feedback.label_records import Source
    from alignkit.feedback.labeling import load_prompts

    prompts_file = jsonl(tmp_path / "lp.jsonl", [{"prompt": p} for p in PROMPTS])
    a = jsonl(tmp_path / "ra.jsonl", [{"prompt": p, "response": "apple, pear, plum"} for p in PROMPTS])
    b = jsonl(tmp_path / "rb.jsonl", responses_b)
    settings = label_settings(prompts=prompts_file, responses_a=a, responses_b=b, **values)
    run = SimpleNamespace(settings=settings, stats=Counter(),
                          sources=[Source(a, a, "file", 0), Source(b, b, "file", 1)])
    return run, load_prompts(run), b


def test_responses_matching_no_prompt_are_refused_naming_a_pair(tmp_path):
    from alignkit.feedback.labeling import collect_responses

    run, prompts, b = file_run(tmp_path, [{"prompt": p + " ", "response": "fig, kiwi, lime"} for p in PROMPTS])
    with pytest.raises(DataError) as err:
        collect_responses(run, prompts)
    assert str(err.value) == (
        f"{b}: none of its 4 prompts (field 'prompt') is one of the 4 prompts to label, which are matched exactly: "
        f"e.g. its row 1, 'name three fruits. ', and {tmp_path}/lp.jsonl: row 1, 'name three fruits.' (they differ "
        "only in leading or trailing whitespace). Strip the stray whitespace so the prompts are the same text")

    run, prompts, b = file_run(tmp_path, [{"prompt": "say hi.", "response": "hi"}])
    with pytest.raises(DataError) as err:
        collect_responses(run, prompts)
    assert str(err.value) == (
        f"{b}: none of its 1 prompts (field 'prompt') is one of the 4 prompts to label, which are matched exactly: "
        f"e.g. its row 1, 'say hi.', and {tmp_path}/lp.jsonl: row 1, 'name three fruits.'. Give it the same prompts "
        f"as {tmp_path}/lp.jsonl, or pass --prompt_field with its column that holds them")


def test_responses_matching_some_prompts_still_pair_those(tmp_path):
    from alignkit.feedback.labeling import collect_responses

    run, prompts, _ = file_run(tmp_path, [{"prompt": PROMPTS[1], "response": "cat, dog, cow"}])
    table = collect_responses(run, prompts)
    assert table[1] == [None, "cat, dog, cow", None, None]


def test_a_prompt_with_two_responses_is_refused_naming_both_rows(tmp_path):
    from alignkit.feedback.label_inputs import read_responses

    rows = [{"prompt": p, "response": "fig, kiwi, lime"} for p in PROMPTS]
    same = jsonl(tmp_path / "same.jsonl", rows + [rows[2]])  # the same response again: nothing is ambiguous
    assert len(read_responses(same, label_settings())) == 4
    path = jsonl(tmp_path / "rb.jsonl", rows + [{"prompt": PROMPTS[2], "response": "red"}], blank_after=2)
    with pytest.raises(DataError) as err:
        read_responses(path, label_settings())
    assert str(err.value) == (
        f"{path}: row 6: field 'prompt': the same prompt as row 4 but a different response, so which one to pair is "
        "ambiguous. Keep one row per prompt (delete or merge the other)")


def test_margins_stay_with_their_rows_where_skip_invalid_skips_one(tiny_cache, tmp_path):
    """--skip_invalid with --use_margin was refused ("their margins no longer line up"): the margins were read by
    position apart from the pairs. Each pair now keeps its own row's margin."""
    from alignkit.modeling import presets
    from conftest import run_script

    rows = [json.loads(line) for line in open(presets.paths()["preferences"])][:40]
    rows = [{**row, "margin": float(i)} for i, row in enumerate(rows)]
    rows[3]["chosen"] = 5  # invalid: skipped
    data = jsonl(tmp_path / "pairs.jsonl", rows, blank_after=None)
    # No --use_margin: a 'margin' column is read as TRL's RewardTrainer reads it (it was left out without a word)
    run = run_script("reward.py", "--preset", "tiny", "--dataset_id", data, "--skip_invalid",
                     "--max_steps", "1", "--output_dir", str(tmp_path / "runs"))
    def key(pair):
        return tuple(m["content"] for m in pair["prompt"] + pair["chosen"] + pair["rejected"])

    pairs = list(run["train_data"]) + (list(run["eval_data"]) if run["eval_data"] else [])
    by_pair = {key(row): float(i) for i, row in enumerate(rows) if i != 3}
    assert len(pairs) == 39 and all(pair["margin"] == by_pair[key(pair)] for pair in pairs)  # each its own row's
    # --use_margin false: none; auto over scores alone: none (their difference is a margin only when asked)
    from types import SimpleNamespace

    from alignkit.core.data import load_preferences
    from alignkit.train.reward import with_margins

    scored = jsonl(tmp_path / "scored.jsonl", [{**{k: v for k, v in row.items() if k != "margin"}, "score_chosen": 2,
                                                "score_rejected": 1} for row in rows[:3]], blank_after=None)
    for source, use, expected in ((data, "false", None), (scored, "auto", None), (scored, "true", [1.0, 1.0, 1.0])):
        s = SimpleNamespace(dataset_id=source, dataset_split="train", dataset_config=None, use_margin=use)
        pairs = load_preferences(scored)
        got = with_margins(pairs, s)
        assert (got["margin"] if "margin" in got.column_names else None) == expected, (source, use)
