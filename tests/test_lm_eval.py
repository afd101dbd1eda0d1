"""evaluate.py lm_eval: lm-evaluation-harness on the tiny preset's local task (a YAML config over a local JSONL),
for the base model and tuned ones (an adapter, and an adapter over an adapter), side by side; offline."""

from __future__ import annotations

import json
import sys

import pytest

from alignkit.core.errors import UserError
from alignkit.evals import harness
from alignkit.evals.named_models import parse_models

from conftest import run_script


@pytest.fixture(scope="module")
def tuned(tiny_cache, tmp_path_factory):
    """Two short tuned runs: ORPO on the base (no reference), KTO on top of that ORPO adapter (a chain)."""
    out = tmp_path_factory.mktemp("tuned")
    orpo = run_script("dpo.py", "--preset", "tiny", "--loss_type", "orpo", "--max_steps", "30", "--eval_split", "0",
                      "--output_dir", str(out), "--run_name", "tiny-sft")["run_folder"]
    run_script("kto.py", "--preset", "tiny", "--model_id", str(orpo), "--max_steps", "2", "--eval_split", "0",
               "--output_dir", str(out), "--run_name", "tiny-dpo")
    return out


def test_preset_reports_the_local_task_for_base_and_tuned_models(tuned, tmp_path, monkeypatch, capfd, caplog):
    """`python evaluate.py lm_eval --preset tiny` as typed, from a folder whose runs/ holds tiny-sft and tiny-dpo."""
    (tmp_path / "runs").symlink_to(tuned, target_is_directory=True)
    monkeypatch.setenv("CI", "true")  # a log nothing reads interactively
    run = run_script("evaluate.py", "lm_eval", "--preset", "tiny", "--limit", "40", cwd=tmp_path)
    # lm_eval's own bars (tqdm's, drawn by the line) follow alignkit's rule: none in a log; the preset's own task
    # declares each metric's aggregation and direction (lm_eval warned of both for tiny_text, three lines a run).
    err = capfd.readouterr().err
    assert "Running loglikelihood requests" not in err and "is defined, but" not in err + caplog.text
    # Nor lm_eval's noise the user cannot act on (the evaluate audit of session 31), run from no git repository:
    # a warning against the model alignkit hands it, for every model, and git's "fatal: not a git repository".
    assert "`pretrained` model kwarg is not of type" not in err + caplog.text and "fatal: not a git" not in err
    results = run["lm_results"]
    assert list(results) == ["base", "sft", "dpo"]
    accs = {name: r["tiny_rule"]["acc,none"] for name, r in results.items()}
    assert all(0.0 <= a <= 1.0 for a in accs.values())
    assert all(r["tiny_text"]["bits_per_byte,none"] > 0 for r in results.values())
    out = tmp_path / "outputs" / "lm_eval-tiny"
    table = (out / "results.md").read_text()
    assert "| tiny_rule | acc | " in table and "| tiny_text | bits_per_byte | " in table and "| base | sft | dpo |" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["results"]["dpo"]["tiny_rule"]["acc,none"] == accs["dpo"]
    # A rerun reuses each model's kept results instead of evaluating again.
    again = run_script("evaluate.py", "lm_eval", "--preset", "tiny", "--limit", "40", cwd=tmp_path)
    assert again["lm_results"] == results


def test_the_tiny_tasks_are_lm_evals_own_yaml_over_local_files(tmp_path):
    from alignkit.modeling.presets import follows_rule

    folder = harness.tiny_task(tmp_path / "tasks", n=10)
    for name in harness.TINY_TASKS:
        config = (folder / f"{name}.yaml").read_text()
        assert f"task: {name}\ndataset_path: json" in config and str((folder / f"{name}.jsonl").resolve()) in config
    rule = [json.loads(line) for line in (folder / "tiny_rule.jsonl").read_text().splitlines()]
    assert len(rule) == 10
    assert all(follows_rule(r["prompt"], r["choices"][0]) and not follows_rule(r["prompt"], r["choices"][1]) for r in rule)
    text = [json.loads(line)["text"] for line in (folder / "tiny_text.jsonl").read_text().splitlines()]
    assert len(text) == 10 and all(t.startswith("<|user|>") and t.endswith("<|end|>") for t in text)


def test_missing_lm_eval_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'alignkit\[lm_eval\]'") as e:
        harness.require()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--models", "bad name=x", "--tasks", "tiny_rule"], "write NAME=ID_OR_PATH"),
    (["--models", "a=./runs/dpo@v1", "--tasks", "tiny_rule"], "a local folder has no revision"),
    (["--models", "a=x", "a=y", "--tasks", "tiny_rule"], "'a' is given twice"),
    (["--models", "a=x"], "pass the tasks"),
    # lm_eval ran a negative few-shot count zero-shot, and a limit of 2.5 as 2, under results that named what was asked.
    (["--models", "a=x", "--tasks", "tiny_rule", "--num_fewshot", "-1"], r"^--num_fewshot must be >= 0 .*got -1$"),
    (["--models", "a=x", "--tasks", "tiny_rule", "--limit", "2.5"], r"^--limit 2.5: give a whole number of examples"),
    # A limit of 0 was refused without the fix ("limit must be > 0, got 0.0").
    (["--models", "a=x", "--tasks", "tiny_rule", "--limit", "0"], r"^--limit must be > 0 \(examples per task, or a "
                                                                   r"share below 1; leave it unset for every example\)"),
    # lm_eval's own flags that alignkit takes otherwise: refused as an "unknown setting" and no more, or as
    # "'auto' is not an int" for a batch size lm_eval's HF class accepts; now the line names what to pass.
    (["--models", "a=x", "--tasks", "t", "--model_args", "pretrained=x,dtype=bfloat16"], r"--model_args \(on the "
     r"command line; alignkit loads each model and hands it to lm_eval: its loader flags \(--dtype, --quantization"),
    (["--models", "a=x", "--tasks", "t", "--device", "cuda:1"], r"--device .*CUDA_VISIBLE_DEVICES=N\), else on the CPU"),
    (["--models", "a=x", "--tasks", "t", "--log_samples"], r"--log_samples .*keeps each model's results \(OUTPUT_DIR/"
                                                           r"models/NAME.json\), not lm_eval's per-example samples"),
    (["--models", "a=x", "--tasks", "t", "--random_seed", "0"], r"--random_seed .*--seed sets lm_eval's four seeds"),
    (["--models", "a=x", "--tasks", "t", "--batch_size", "0"], r"^--batch_size 0: give a number of 1 or more, auto "),
    (["--models", "a=x", "--tasks", "t", "--batch_size", "auto:0"], r"^--batch_size auto:0: give a number of 1 or more"),
    (["--models", "a=x", "--tasks", "t", "--bootstrap_iters", "-1"], r"^--bootstrap_iters must be >= 0 \(0: no "),
    (["--models", "a=x", "--tasks", "t", "--fewshot_as_multiturn", "--apply_chat_template", "false"],
     r"^--fewshot_as_multiturn true puts the few-shot examples in turns of the chat template: drop it, or pass "
     r"--apply_chat_template true$"),
])
def test_bad_models_and_tasks_are_one_line_errors(flags, message):
    from alignkit.core.args import ConfigError
    from alignkit.evals.evaluation import parse_command

    with pytest.raises(ConfigError, match=message) as e:
        _, s = parse_command(["lm_eval", *flags])
        parse_models(s.models)
    assert "\n" not in str(e.value)


def _lm_eval_flags(*flags):
    from alignkit.evals.evaluation import parse_command

    return parse_command(["lm_eval", "--models", "a=x", "--tasks", "tiny_rule", *flags])[1]


def test_lm_eval_s_own_flags_reach_simple_evaluate_as_lm_eval_reads_them(monkeypatch):
    """--batch_size auto (lm_eval's HF class finds the largest that fits), --fewshot_as_multiturn,
    --system_instruction, --gen_kwargs (as lm_eval's CLI takes them) and --bootstrap_iters were refused; each now
    goes to lm_eval under its own name and meaning."""
    from types import SimpleNamespace

    from alignkit.core.args import ConfigError

    given = {}
    loaded = SimpleNamespace(model=object(), tokenizer=SimpleNamespace(chat_template="{{ x }}"), dtype="torch.float32",
                             quantization="none")
    monkeypatch.setattr("alignkit.modeling.models.load_model", lambda settings: loaded)
    monkeypatch.setattr("lm_eval.models.huggingface.HFLM", lambda **kwargs: given.update(hflm=kwargs))
    lm_eval = SimpleNamespace(simple_evaluate=lambda **kwargs: given.update(kwargs) or {"results": {}})
    s = _lm_eval_flags("--batch_size", "auto:4", "--fewshot_as_multiturn", "false", "--system_instruction",
                       "Answer briefly.", "--gen_kwargs", "temperature=0,stop=['\\n\\n']", "max_gen_toks=64",
                       "--bootstrap_iters", "0")
    harness.evaluate_model(s, "x", lm_eval, None)
    assert given["hflm"]["batch_size"] == "auto:4"
    assert (given["fewshot_as_multiturn"], given["system_instruction"], given["bootstrap_iters"]) == (
        False, "Answer briefly.", 0)
    assert given["gen_kwargs"] == {"temperature": 0, "stop": ["\n\n"], "max_gen_toks": 64}
    # Unset: lm_eval 0.4's own defaults (few-shot examples as turns under the chat template), a number a number.
    harness.evaluate_model(_lm_eval_flags("--batch_size", "16"), "x", lm_eval, None)
    assert given["hflm"]["batch_size"] == 16 and given["fewshot_as_multiturn"] is True
    assert (given["gen_kwargs"], given["system_instruction"], given["bootstrap_iters"]) == (None, None, 100000)
    # A --gen_kwargs lm_eval cannot read is one line before any model loads (lm_eval raised it after).
    with pytest.raises(ConfigError, match=r"^--gen_kwargs 'temperature': expected `key=value`.*; write KEY=VALUE"):
        harness.gen_kwargs(_lm_eval_flags("--gen_kwargs", "temperature"))


def test_lm_eval_s_own_settings_key_the_kept_results_where_they_change_them(tiny_cache, tmp_path):
    """A kept result is never reused for other settings: each of lm_eval's settings that changes the numbers enters
    the key; given at lm_eval's default it leaves the key as results kept before it was a setting (reused)."""
    from alignkit.evals.harness import _key

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")

    def key(*flags):
        return _key(_lm_eval_flags(*flags), str(base))

    plain = key()
    assert key("--fewshot_as_multiturn", "true", "--bootstrap_iters", "100000", "--batch_size", "auto") == plain
    changed = [key("--fewshot_as_multiturn", "false"), key("--system_instruction", "Be brief."),
               key("--gen_kwargs", "temperature=0"), key("--gen_kwargs", "temperature=0.5"),
               key("--bootstrap_iters", "0")]
    assert len({plain, *changed}) == 6
    # Without the chat template there are no turns: --fewshot_as_multiturn false changes nothing there.
    assert key("--apply_chat_template", "false", "--fewshot_as_multiturn", "false") == key("--apply_chat_template",
                                                                                           "false")


def test_an_unknown_task_is_refused_before_any_model_loads(tiny_cache, tmp_path, monkeypatch):
    from alignkit.core.args import ConfigError
    from alignkit.evals.evaluation import parse_command
    from alignkit.modeling import presets

    monkeypatch.setattr(harness, "evaluate_model", lambda *a: pytest.fail("a model was evaluated"))
    _, s = parse_command(["lm_eval", "--models", f"base={presets.paths()['model']}", "--tasks", "no_such_task",
                          "--include_path", str(harness.tiny_task(tmp_path, n=4)), "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="lm_eval has no task 'no_such_task'"):
        harness.run(s)
    # A misspelt task is offered lm_eval's closest; a missing --include_path is named as such (it said "no task").
    s.tasks = ["tiny_rul"]
    with pytest.raises(ConfigError, match=r"^lm_eval has no task 'tiny_rul' \(did you mean 'tiny_rule'\?\)"):
        harness.run(s)
    s.include_path = str(tmp_path / "no_such_folder")
    with pytest.raises(ConfigError, match=r"^--include_path .*no_such_folder: no such folder; pass the folder"):
        harness.run(s)


def test_a_task_whose_data_cannot_be_read_is_one_line_before_any_model_loads(tiny_cache, tmp_path, monkeypatch,
                                                                             alignkit_log):
    """A Hub task offline (hellaswag: datasets' ConnectionError) and a task YAML whose relative data_files lie beside
    it (lm_eval reads them from the folder it runs in: FileNotFoundError) each ended in a 50-line traceback after the
    first model had loaded (the evaluate audit of session 31): one line naming the task, the cause and the fix,
    before any model loads. A task that reads is built once, and the first model's run takes it as built."""
    from alignkit.core.args import ConfigError
    from alignkit.evals.evaluation import parse_command
    from alignkit.modeling import presets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("alignkit.modeling.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    tasks = tmp_path / "tasks"
    (tasks / "data").mkdir(parents=True)
    (tasks / "data" / "rows.jsonl").write_text('{"q": "1+1?", "a": 0}\n')
    body = "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: a\ndoc_to_choice: ['2', '3']\n"
    (tasks / "relative.yaml").write_text("task: relative_rows\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         "    test: data/rows.jsonl\ntest_split: test\n" + body)
    (tasks / "hub.yaml").write_text("task: hub_rows\ndataset_path: no-such-org/no-such-dataset\ntest_split: test\n"
                                    + body)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, s = parse_command(["lm_eval", "--models", f"base={presets.paths()['model']}", "--tasks", "relative_rows",
                          "--include_path", str(tasks), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=rf"^lm_eval task 'relative_rows': its data did not load \(FileNotFoundError: "
                                          rf".*\): lm_eval reads a task's data_files and dataset_path from the folder "
                                          rf"it runs in \({elsewhere}\), not from the YAML's \(it is beside "
                                          rf"{tasks / 'relative.yaml'}\); write them as absolute paths, or run from"):
        harness.run(s)
    s.tasks = ["hub_rows"]
    with pytest.raises(ConfigError, match=r"^lm_eval task 'hub_rows': its data did not load \(.*\): its dataset is on "
                                          r"the Hugging Face Hub, out of reach here \(offline, or HF_HUB_OFFLINE=1"):
        harness.run(s)
    # Without HF_HUB_OFFLINE where the Hub does not answer, datasets retried it for ~90 s before that line (session
    # 31's audit): the tasks read the cache alone now, as with HF_HUB_OFFLINE=1, and the setting is restored after.
    import datasets.config
    from huggingface_hub import constants
    from lm_eval.tasks import TaskManager

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("alignkit.core.sources._probe", lambda endpoint: "ConnectError: no route")
    seen, load = [], TaskManager.load
    monkeypatch.setattr(TaskManager, "load", lambda self, names: seen.append(
        (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)) or load(self, names))
    with pytest.raises(ConfigError, match=r"^lm_eval task 'hub_rows': its data did not load \(.*\): its dataset is on "
                                          r"the Hugging Face Hub, out of reach here"):
        harness.run(s)
    assert seen == [(True, True)] and (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == (False, False)
    assert ("does not answer (ConnectError: no route): lm_eval's tasks read their data from this machine's Hugging "
            "Face cache alone (as with HF_HUB_OFFLINE=1)") in alignkit_log.text
    # HF_HUB_OFFLINE=1 set after the libraries read it (a notebook's %env): theirs too while the tasks load (they
    # asked the Hub all the same, retrying for 20 s and more before the line), restored after.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A folder beside the YAML as dataset_path is taken for a Hub id from elsewhere: said as the path it is.
    (tasks / "folder.yaml").write_text("task: folder_rows\ndataset_path: data\ntest_split: test\n" + body)
    s.tasks = ["folder_rows"]
    with pytest.raises(ConfigError, match=rf"^lm_eval task 'folder_rows': its data did not load .*not from the YAML's "
                                          rf"\(it is beside {tasks / 'folder.yaml'}\)"):
        harness.run(s)
    assert seen[-1] == (True, True) and (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == (False, False)
    (tasks / "gone.yaml").write_text(f"task: gone_rows\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    "
                                     f"test: {tmp_path / 'gone.jsonl'}\ntest_split: test\n" + body)
    s.tasks = ["gone_rows"]  # an absolute path that is not there: no advice to write it as one
    with pytest.raises(ConfigError, match=r"^lm_eval task 'gone_rows': its data did not load .*: check the task's "
                                          r"data_files and dataset_path \(a relative path is read from"):
        harness.run(s)
    # A task's own code: a module it needs is one line with the install; its own bug keeps its traceback.
    (tasks / "utils.py").write_text("import random\n\ndef broken(dataset):\n    raise ValueError('my bug')\n\n"
                                    "def needs(dataset):\n    import no_such_module_xyz\n\n"
                                    "def draws(dataset):\n    return dataset.map(lambda row: {'r': random.random()})\n")
    for kind in ("broken", "needs", "draws"):
        (tasks / f"{kind}.yaml").write_text(f"task: {kind}_rows\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {tasks / 'data' / 'rows.jsonl'}\ntest_split: test\n"
                                            f"process_docs: !function utils.{kind}\n" + body)
    monkeypatch.setattr(harness, "_TASK_MANAGERS", {})  # the folder changed: indexed again
    s.tasks = ["needs_rows"]
    with pytest.raises(ConfigError, match=r"^lm_eval task 'needs_rows' needs the module no_such_module_xyz, not "
                                          r"installed: pip install no_such_module_xyz"):
        harness.run(s)
    s.tasks = ["broken_rows"]
    with pytest.raises(ValueError, match="my bug"):
        harness.run(s)
    # Built under --seed, as simple_evaluate builds them: a process_docs drawing from `random` (GPQA shuffles its
    # choices so) drew whatever the global state was (the review of session 31).
    import random

    import datasets
    from lm_eval.tasks import TaskManager

    s.tasks = ["draws_rows"]
    manager = harness._task_manager(TaskManager, str(tasks), s.tasks)  # as run() indexes them
    datasets.disable_caching()
    try:
        drawn = []
        for state in (1, 2):
            random.seed(state)
            (task,) = harness.load_tasks(s, manager)
            drawn.append([doc["r"] for doc in task.test_docs()])
    finally:
        datasets.enable_caching()
    assert drawn[0] == drawn[1]
    monkeypatch.chdir(tasks)  # where the relative path is read from: the task is built, once, and handed on
    s.tasks = ["relative_rows"]
    handed = []
    monkeypatch.setattr(harness, "evaluate_model", lambda s, source, lm_eval, manager, built: handed.append(built)
                        or {"results": {}})
    monkeypatch.setattr(harness, "format_table", lambda results: "")
    monkeypatch.setattr(harness, "plot", lambda results, path: path)
    harness.run(s)
    (task,) = handed[0]
    assert type(task).__name__ == "ConfigurableTask" and task.task_name == "relative_rows"
    assert len(list(task.test_docs())) == 1


def test_a_missing_model_is_refused_before_the_first_model_is_evaluated(tiny_cache, tmp_path, monkeypatch):
    """The first model was evaluated whole before the second was found missing (as evaluate.py's MT-Bench, found by
    an audit); one whose kept results are reused need not be there."""
    from alignkit.core.errors import UserError
    from alignkit.evals.evaluation import parse_command
    from alignkit.modeling import presets

    monkeypatch.setattr(harness, "evaluate_model", lambda *a: pytest.fail("a model was evaluated"))
    _, s = parse_command(["lm_eval", "--models", f"base={presets.paths()['model']}", "gone=/nowhere/gone", "--tasks",
                          "tiny_rule", "--include_path", str(harness.tiny_task(tmp_path / "tasks", n=4)),
                          "--output_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match=r"^model not found: /nowhere/gone is no local folder"):
        harness.run(s)


def test_kept_results_key_on_the_model_as_loaded_and_the_task_files(tiny_cache, tmp_path):
    """A model retrained in place, or a local task edited, is evaluated again; nothing else changes the key."""
    import json
    import os

    from alignkit.core.config import LMEvalSettings
    from alignkit.evals.harness import _key

    base, adapter, tasks = tmp_path / "base", tmp_path / "adapter", tmp_path / "tasks"
    for folder in (base, adapter, tasks):
        folder.mkdir()
    (base / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights one")
    (tasks / "task.yaml").write_text("task: t\n")
    s = LMEvalSettings(models=[f"a={adapter}"], tasks=["t"], include_path=str(tasks))
    first = _key(s, str(adapter))
    assert _key(s, str(adapter)) == first
    stat = (base / "config.json").stat()
    (base / "config.json").write_text("{ }")  # the base retrained in place, down the chain
    os.utime(base / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = _key(s, str(adapter))
    assert second != first
    (tasks / "task.yaml").write_text("task: t2\n")
    third = _key(s, str(adapter))
    assert third != second
    # A task whose rows live outside --include_path (lm_eval's own tags read as nothing): its data counts too.
    rows = tmp_path / "elsewhere" / "rows.jsonl"
    rows.parent.mkdir()
    rows.write_text('{"text": "one"}\n')
    (tasks / "task.yaml").write_text(f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\n"
                                     "process_docs: !function utils.process\n")
    fourth = _key(s, str(adapter))
    rows.write_text('{"text": "two"}\n')
    assert _key(s, str(adapter)) != fourth


def test_a_torn_kept_result_is_evaluated_again_and_results_are_written_whole(tiny_cache, tmp_path, monkeypatch):
    """A kept models/NAME.json cut short by a kill (written in place by an older version) is no result: the model
    is evaluated again instead of the rerun stopping on a JSONDecodeError. Every file is now written atomically."""
    from alignkit.evals.evaluation import parse_command
    from alignkit.modeling import presets

    calls = []
    scores = {"tiny_rule": {"acc,none": 0.75, "acc_stderr,none": 0.05}}
    monkeypatch.setattr(harness, "_key", lambda s, source: "the-key")
    monkeypatch.setattr(harness, "evaluate_model", lambda s, source, *a: calls.append(source) or {"results": scores})
    _, s = parse_command(["lm_eval", "--models", f"base={presets.paths()['model']}", "--tasks", "tiny_rule",
                          "--include_path", str(harness.tiny_task(tmp_path / "tasks", n=4)),
                          "--output_dir", str(tmp_path / "out")])
    kept = tmp_path / "out" / "models" / "base.json"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"key": "the-key", "results": {"tiny_ru')
    results = harness.run(s)[0]
    assert calls == [presets.paths()["model"]] and results == {"base": scores}
    assert json.loads(kept.read_text())["the-key"]["key"] == "the-key"
    assert harness.run(s)[0] == {"base": scores} and len(calls) == 1  # whole now: reused
    assert not [p for p in (tmp_path / "out").rglob(".*tmp*")]


def test_a_limited_run_keeps_the_full_results_and_says_what_it_was_made_under(tiny_cache, tmp_path, monkeypatch):
    """A --limit 5 run replaced a model's kept full results (the next full run evaluated it again), and results.md
    said nothing of --limit, few-shot or the chat template: 5 examples a task read as the model's scores."""
    from alignkit.evals.evaluation import parse_command
    from alignkit.modeling import presets

    calls = []
    monkeypatch.setattr(harness, "_key", lambda s, source: f"limit-{s.limit}")
    monkeypatch.setattr(harness, "evaluate_model", lambda s, source, *a: calls.append(s.limit) or {
        "results": {"tiny_rule": {"acc,none": 0.5 if s.limit else 0.75}}})
    tasks = str(harness.tiny_task(tmp_path / "tasks", n=4))
    out = tmp_path / "out"

    def run(*flags):
        _, s = parse_command(["lm_eval", "--models", f"base={presets.paths()['model']}", "--tasks", "tiny_rule",
                              "--include_path", tasks, "--output_dir", str(out), *flags])
        return harness.run(s)[0]["base"]["tiny_rule"]["acc,none"]

    assert run() == 0.75 and "--limit" not in (out / "results.md").read_text()
    assert run("--limit", "5") == 0.5
    said = (out / "results.md").read_text().splitlines()[0]
    assert said.startswith("lm_eval ") and "--limit 5: the first examples of each task only, a quick look, not " \
        "comparable to full results; few-shot: each task's default; chat template: applied, few-shot examples as " \
        "turns; seed 42" in said
    assert json.loads((out / "results.json").read_text())["settings"]["limit"] == 5
    assert run() == 0.75 and calls == [None, 5]  # the full results were kept beside the limited ones
    # A kept file written before (one entry, its key at the top) is read as that entry.
    kept = out / "models" / "base.json"
    kept.write_text(json.dumps({"key": "limit-None", "results": {"tiny_rule": {"acc,none": 0.25}}}))
    assert run() == 0.25 and calls == [None, 5]
    for limit in range(1, harness.KEPT_PER_MODEL + 2):  # kept without end, the file would grow with every retraining
        run("--limit", str(limit))
    assert list(json.loads(kept.read_text())) == [f"limit-{float(n)}" for n in range(2, harness.KEPT_PER_MODEL + 2)]


def test_lm_eval_s_task_index_is_built_once_a_process_and_again_when_a_task_file_changes(tmp_path, monkeypatch):
    """lm_eval's TaskManager reads every task's YAML on each build (7 s and more): an evaluate cell run again, or
    each model of a run, built it anew. It is kept for the --include_path as its files are, and an edited task
    file is read anew. Tasks of the folder alone are indexed from it alone: lm_eval's own 14,000 YAMLs were read
    (4 to 7 s) to build a local task, or to refuse one whose data does not load."""
    import os
    from types import SimpleNamespace

    builds = []
    kinds = {"tiny_rule": "TASK", "tiny_text": "TASK", "tiny_tag": "TAG", "tiny_group": "GROUP"}

    class Manager:
        def __init__(self, include_path=None, include_defaults=True):
            builds.append((include_path, include_defaults))
            self.task_index = {name: SimpleNamespace(kind=SimpleNamespace(name=kind)) for name, kind in kinds.items()}

    monkeypatch.setattr(harness, "_TASK_MANAGERS", {})
    tasks = harness.tiny_task(tmp_path / "tasks", n=4)
    first = harness._task_manager(Manager, str(tasks), ["tiny_rule"])
    assert harness._task_manager(Manager, str(tasks), ["tiny_rule", "tiny_tag"]) is first
    assert builds == [(str(tasks), False)]
    # lm_eval's own task (or a name in neither) and a group (whose tasks may be lm_eval's): the whole index, kept too.
    whole = harness._task_manager(Manager, str(tasks), ["tiny_rule", "hellaswag"])
    assert whole is not first and builds[-1] == (str(tasks), True)
    assert harness._task_manager(Manager, str(tasks), ["tiny_group"]) is whole
    assert harness._task_manager(Manager, str(tasks), ["tiny_text"]) is first and len(builds) == 2
    yaml = next(tasks.rglob("*.yaml"))
    yaml.write_text(yaml.read_text() + "\n# edited\n")
    os.utime(yaml, ns=(1, 1))  # the same second as before on a coarse clock: the size tells it
    assert harness._task_manager(Manager, str(tasks), ["tiny_rule"]) is not first and len(builds) == 3
    assert harness._task_manager(Manager, None, ["tiny_rule"]) is not None and builds[-1] == (None, True)
    # lm_eval's own TaskManager, on the tiny tasks: the folder's two, none of lm_eval's.
    from lm_eval.tasks import TaskManager

    local = harness._task_manager(TaskManager, str(tasks), list(harness.TINY_TASKS))
    assert local.all_tasks == list(harness.TINY_TASKS)


def test_results_name_each_model_as_loaded(tiny_cache, tmp_path, monkeypatch):
    """results.json and results.md named each model by its source alone: an evaluation in 4-bit and one in bf16
    of the same model, or one under another --chat_template, could not be told apart. Each model's loader settings
    and what `auto` became are said beside its numbers, kept results reused included."""
    from alignkit.evals.evaluation import parse_command
    from alignkit.modeling import presets

    calls = []
    monkeypatch.setattr(harness, "evaluate_model", lambda s, source, *a: calls.append(source) or {
        "results": {"tiny_rule": {"acc,none": 0.5}}, "as_loaded": {"dtype": "float32", "quantization": "none"}})
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    base = presets.paths()["model"]
    out = tmp_path / "out"
    _, s = parse_command(["lm_eval", "--models", f"base={base}", "--tasks", "tiny_rule", "--include_path",
                          str(harness.tiny_task(tmp_path / "tasks", n=4)), "--output_dir", str(out),
                          "--dtype", "fp32", "--chat_template", str(template)])
    for _ in range(2):  # evaluated, then its kept results reused
        harness.run(s)
        loaded = json.loads((out / "results.json").read_text())["loaded_with"]["base"]
        assert loaded["model_id"] == base and loaded["dtype"] == "fp32" and loaded["chat_template"] == str(template)
        assert loaded["as_loaded"] == {"dtype": "float32", "quantization": "none"}
        said = (out / "results.md").read_text().splitlines()[2]
        assert said == f"models: base: {base} (float32, quantization none; --chat_template given)"
    assert calls == [base]
    kept = json.loads((out / "models" / "base.json").read_text())
    assert [e["loaded_with"]["dtype"] for e in kept.values()] == ["fp32"]


def test_lm_eval_s_warnings_against_the_model_alignkit_hands_it_are_not_shown(tiny_cache, capfd, caplog):
    """lm_eval's HF class warned twice for every model that alignkit hands it loaded: the second warning ("Passed an
    already-initialized model through `pretrained`, assuming single-process call...") came through, one line a
    model that the user cannot act on."""
    from lm_eval.models.huggingface import HFLM

    from alignkit.core.groups import ModelSettings
    from alignkit.modeling import presets
    from alignkit.modeling.models import load_model

    loaded = load_model(ModelSettings(model_id=presets.paths()["model"], quantization="none", num_threads="1"))
    harness._quiet_lm_eval()
    with caplog.at_level("DEBUG"):
        HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    said = capfd.readouterr().err + caplog.text
    assert "`pretrained` model kwarg" not in said and "already-initialized model" not in said


def test_results_say_lm_eval_s_own_settings_and_keep_each_apart(tiny_cache, tmp_path, monkeypatch):
    """lm_eval 0.4 puts few-shot examples in turns of the chat template unless told otherwise, and results.md and
    results.json did not say so; --system_instruction, --gen_kwargs and --bootstrap_iters are said beside the
    numbers too, and a model evaluated under one is evaluated again under another (its kept results stay)."""
    from alignkit.evals.evaluation import parse_command
    from alignkit.modeling import presets

    calls = []
    monkeypatch.setattr(harness, "evaluate_model", lambda s, source, *a: calls.append(s.system_instruction) or {
        "results": {"tiny_rule": {"acc,none": 0.5}}})
    tasks, out = str(harness.tiny_task(tmp_path / "tasks", n=4)), tmp_path / "out"

    def run(*flags):
        _, s = parse_command(["lm_eval", "--models", f"base={presets.paths()['model']}", "--tasks", "tiny_rule",
                              "--include_path", tasks, "--output_dir", str(out), *flags])
        harness.run(s)
        return (out / "results.md").read_text().splitlines()[0], json.loads((out / "results.json").read_text())

    said, data = run()
    assert "chat template: applied, few-shot examples as turns;" in said
    assert {k: data["settings"][k] for k in ("fewshot_as_multiturn", "system_instruction", "gen_kwargs",
                                             "bootstrap_iters")} == {"fewshot_as_multiturn": True,
                                                                     "system_instruction": None, "gen_kwargs": None,
                                                                     "bootstrap_iters": 100000}
    said, data = run("--fewshot_as_multiturn", "false", "--system_instruction", "Be brief.", "--gen_kwargs",
                     "temperature=0", "--bootstrap_iters", "0")
    assert ("chat template: applied, few-shot examples in one user turn; system instruction: 'Be brief.'; "
            "gen_kwargs: temperature=0; bootstrap_iters 0 (no standard errors); seed 42") in said
    assert data["settings"]["gen_kwargs"] == {"temperature": 0} and data["settings"]["fewshot_as_multiturn"] is False
    assert calls == [None, "Be brief."]
    said, data = run("--apply_chat_template", "false")
    assert "chat template: not applied;" in said and data["settings"]["fewshot_as_multiturn"] is None
    run()
    assert calls == [None, "Be brief.", None]  # the first settings' results, kept: reused
