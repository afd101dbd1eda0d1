"""What answers and verdicts are keyed on: the question as it now reads, and a rule judge's whole code.

MT-Bench / `evaluate.py pairwise` answers are reused per question only while the question reads the same (its
turns, its category and so its temperature); a verdict only while the judged question does. A rule judge is
keyed on its module's file and the alignkit modules (or files beside it) that module imports, not just the
function's lines: a constant it reads changes its verdicts. No model is loaded here: a fake generator echoes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import pytest

from conftest import run_script

from alignkit.evals import judgments, mtbench


@pytest.fixture(autouse=True)
def no_judge_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def echo(monkeypatch):
    """load_generator stands in for a model that answers "<model> on <last user turn>"; records what it was asked."""
    from alignkit.modeling import generation

    asked = []

    @contextlib.contextmanager
    def load_generator(settings, backend="auto"):
        def generate(conversations, **kw):
            asked.extend((settings.model_id, c[-1]["content"], kw["temperature"]) for c in conversations)
            return [f"{settings.model_id} on {c[-1]['content']}" for c in conversations]
        yield generate

    monkeypatch.setattr(generation, "load_generator", load_generator)
    from alignkit.modeling import model_folders

    monkeypatch.setattr(model_folders, "check_model_sources", lambda s, sources: None)  # the models are this stand-in
    return asked


def write_prompts(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def pairwise(prompts: Path, output_dir: Path, *extra) -> dict:
    return run_script("evaluate.py", "pairwise", "--prompts_file", str(prompts), "--models", "alpha=/nowhere/alpha",
                      "omega=/nowhere/omega", "--judge_model", "rule", "--output_dir", str(output_dir), *extra)


def judged(run) -> list[int]:
    return sorted(m.question["question_id"] for m in run["todo"])


ROWS = [{"prompt": "name three fruits."}, {"prompt": "name three colors."}, {"prompt": "name three animals."}]


def test_an_edited_prompt_is_answered_and_judged_again_and_only_it(echo, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, ROWS)
    first = pairwise(prompts, tmp_path / "out")
    assert len(echo) == 6 and judged(first) == [1, 2, 3]
    echo.clear()
    assert judged(pairwise(prompts, tmp_path / "out")) == [] and echo == []  # nothing changed: all reused

    write_prompts(prompts, [ROWS[0], {"prompt": "name three tools."}, ROWS[2]])  # row 2 (question_id 2) edited
    again = pairwise(prompts, tmp_path / "out")
    assert sorted(echo) == [("/nowhere/alpha", "name three tools.", 0.7), ("/nowhere/omega", "name three tools.", 0.7)]
    assert judged(again) == [2]
    answers = mtbench.read_answers(mtbench.answer_path(tmp_path / "out", "alpha"))
    assert answers[2]["choices"][0]["turns"] == ["/nowhere/alpha on name three tools."]
    assert answers[1]["choices"][0]["turns"] == ["/nowhere/alpha on name three fruits."]  # the others kept
    (match,) = [m for m in again["run"].matches if m.question["question_id"] == 2]
    assert match.answer_1["choices"][0]["turns"][0].endswith("tools.")  # judged on the new answers

    echo.clear()
    write_prompts(prompts, [{"prompt": "say hello."}, ROWS[0], {"prompt": "name three tools."}, ROWS[2]])
    pairwise(prompts, tmp_path / "out")  # a row inserted on top: every line number now names another prompt
    assert sorted(p for _, p, _ in echo) == sorted(2 * ["say hello.", *(r["prompt"] for r in ROWS[:1]),
                                                        "name three tools.", ROWS[2]["prompt"]])


def test_a_category_change_is_answered_again_at_its_temperature(echo, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, ROWS)
    pairwise(prompts, tmp_path / "out")
    echo.clear()
    write_prompts(prompts, [ROWS[0], {**ROWS[1], "category": "math"}, ROWS[2]])  # FastChat: math at temperature 0
    again = pairwise(prompts, tmp_path / "out")
    assert sorted(echo) == [(model, "name three colors.", 0.0) for model in ("/nowhere/alpha", "/nowhere/omega")]
    assert judged(again) == [2]


def test_old_answers_without_a_question_key(echo, tmp_path):
    """alignkit's answers from before question keys are answered once more; answers made elsewhere are taken."""
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, ROWS)
    pairwise(prompts, tmp_path / "out")
    path = mtbench.answer_path(tmp_path / "out", "alpha")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "question_key"}) + "\n" for r in rows))
    echo.clear()
    pairwise(prompts, tmp_path / "out")
    assert sorted(echo) == [("/nowhere/alpha", r["prompt"], 0.7) for r in sorted(ROWS, key=lambda r: r["prompt"])]
    path.write_text("".join(json.dumps({"question_id": q, "answer_id": f"x{q}", "model_id": "alpha", "tstamp": 0,
                                        "choices": [{"index": 0, "turns": ["made elsewhere"]}]}) + "\n"
                            for q in (1, 2, 3)))
    echo.clear()
    pairwise(prompts, tmp_path / "out")
    assert echo == []


def test_answers_made_elsewhere_without_ids_are_judged_again_when_edited(tmp_path):
    """An answers file without answer_id (written by hand or another tool), edited in place, kept its verdicts."""
    question = {"question_id": 1, "category": "prompts", "turns": ["name three fruits."]}
    judge = types.SimpleNamespace(prompt_template={"name": "rule"}, model_name="rule")

    def match(turn):
        return types.SimpleNamespace(question=question, judge=judge, ref_answer=None, model_1="a", model_2="b",
                                     multi_turn=False, answer_1={"choices": [{"index": 0, "turns": [turn]}]},
                                     answer_2={"choices": [{"index": 0, "turns": ["pear,plum,fig."]}]})

    identity = {"rule": "r", "code": "c"}
    path = tmp_path / "rule_pair.jsonl"
    judgments.judge_matches([match("apple,pear,fig.")], judgments.rule_player(lambda q, a, b: "A"), path, identity, 1)
    records = judgments.read_judgments(path)
    assert judgments.settled(match("apple,pear,fig."), records, "$ERROR$", identity) is not None
    assert judgments.settled(match("car,bus,train."), records, "$ERROR$", identity) is None


def test_an_edited_question_is_judged_again_even_on_answers_made_elsewhere(tmp_path):
    question = {"question_id": 1, "category": "prompts", "turns": ["name three fruits."]}
    judge = types.SimpleNamespace(prompt_template={"name": "rule"})
    match = types.SimpleNamespace(question=question, judge=judge, ref_answer=None)
    edited = types.SimpleNamespace(**{**vars(match), "question": {**question, "turns": ["name three tools."]}})
    identity = {"rule": "r", "code": "c"}
    assert judgments.judge_key(match, identity) != judgments.judge_key(edited, identity)
    assert mtbench.question_key(question) != mtbench.question_key(edited.question)
    assert mtbench.question_key(question) != mtbench.question_key({**question, "category": "math"})


# ---------------------------------------------------------------------------------------------------------
# Rule judges: keyed on their module's file and the code it imports, all the way down


RULE = '''
from keys_helper import SHORT
from alignkit.feedback.judge import TOKENS

MARGIN = {margin}


def rule(prompt, answer_a, answer_b):
    return "tie" if abs(len(answer_a) - len(answer_b)) <= MARGIN + SHORT else "A" if answer_a < answer_b else "B"


def grade(prompt, answer):
    return len(answer) <= MARGIN
'''


def load_rule(folder: Path, margin: int, short: int = 0):
    """python:FOLDER/rules.py:rule, after writing rules.py (MARGIN = margin) and keys_helper.py (SHORT = short)
    beside it."""
    (folder / "rules.py").write_text(RULE.format(margin=margin))
    (folder / "keys_helper.py").write_text(f"SHORT = {short}\n")
    return f"python:{folder / 'rules.py'}:rule"


def identities(spec: str, monkeypatch) -> dict:
    """The rule's identity in each of its caches: label.py pairs and pointwise grades, evaluate.py pairwise."""
    from alignkit.feedback.judge import PythonJudge, import_function
    from alignkit.feedback.pointwise import Grader

    # `from helper import ...` resolves. Not monkeypatch.syspath_prepend: it fails where alpaca_eval's pkg_resources
    # stand-in is loaded (an earlier test in the same worker).
    monkeypatch.setattr(sys, "path", [str(Path(spec.split(":")[1]).parent), *sys.path])
    grader = Grader(types.SimpleNamespace(judge=spec.replace(":rule", ":grade"), grade_threshold=None))
    return {"label": PythonJudge(spec).identity(), "pointwise": grader.identity(),
            "mt_bench": judgments.judge_identity(rule=import_function(spec))}


def test_a_constant_the_rule_reads_changes_its_identity(tmp_path, monkeypatch):
    base = identities(load_rule(tmp_path, 1), monkeypatch)
    assert identities(load_rule(tmp_path, 1), monkeypatch) == base  # the same files: the same identity
    margin = identities(load_rule(tmp_path, 2), monkeypatch)  # the function's own lines are unchanged
    helper = identities(load_rule(tmp_path, 1, short=5), monkeypatch)  # a module it imports, beside it
    for cache in base:
        assert len({json.dumps(ids[cache], sort_keys=True) for ids in (base, margin, helper)}) == 3, cache


def edit_as_read(monkeypatch, module, old: bytes, new: bytes) -> None:
    """`module`'s file as every key reads it (Path.read_bytes) with `old` replaced by `new`; the file stays."""
    import functools

    from alignkit.core import code_digest

    # Its memo keys on the file's stat, which an edit as read leaves alone: a fresh memo for this test only.
    monkeypatch.setattr(code_digest, "_parsed", functools.lru_cache(maxsize=None)(code_digest._parsed.__wrapped__))
    real, target = Path.read_bytes, Path(module.__file__).resolve()
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self).replace(old, new) if self.resolve() == target
                        else real(self))


def test_a_rule_is_keyed_on_the_alignkit_modules_it_imports(monkeypatch):
    from alignkit.feedback import judge
    from alignkit.modeling import presets, smol

    def keys():
        return (judge.PythonJudge("python:alignkit.modeling.smol:rule_judge").identity(),
                judgments.judge_identity(rule=smol.rule_judge), judgments.judge_identity(rule=presets.rule_judge))

    before = keys()
    assert keys() == before
    edit_as_read(monkeypatch, smol, b"TIE_MARGIN = 0.05", b"TIE_MARGIN = 0.5")  # rule_judge's lines unchanged
    # smol's own rule, and the tiny rule of presets.py, which imports smol (inside a function).
    assert all(a != b for a, b in zip(keys(), before))


def test_a_rule_is_keyed_on_all_the_user_code_it_reads_down_to_installed_libraries(tmp_path, monkeypatch):
    """A package's module imported by its package name (`from mypkg.prefs import PREFER`, beside the rule's folder on
    sys.path, not in it), what that imports in turn, a functools.partial binding a constant, a callable object: each
    edit in place changes the key (they were all left out, or keyed on nothing: verdicts from the old code reused).
    Installed libraries and the standard library are not followed; code with no source is reused by no other
    process."""
    import functools
    import importlib
    import subprocess

    from alignkit.core.code_digest import code_fingerprint
    from alignkit.feedback.judge import import_function

    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "prefs.py").write_text("from mypkg.words import WORD\nPREFER = WORD\n")
    (package / "words.py").write_text("import json, torch\nWORD = 'apple'\n")
    (package / "rules.py").write_text(
        "import functools\nfrom mypkg.prefs import PREFER\n\n\n"
        "def judge(prompt, a, b, prefer=PREFER):\n    return 'A' if prefer in a else 'B'\n\n\n"
        "bound = functools.partial(judge, prefer='pear')\n\n\n"
        "class Judge:\n    def __init__(self, prefer):\n        self.prefer = prefer\n\n"
        "    def __call__(self, prompt, a, b):\n        return judge(prompt, a, b, self.prefer)\n\n\n"
        "as_object = Judge('plum')\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    specs = ["python:mypkg.rules:judge", "python:mypkg.rules:bound", "python:mypkg.rules:as_object"]

    def keys():
        return [code_fingerprint(import_function(spec)) for spec in specs]

    before = keys()
    assert keys() == before and len(set(before)) == 3
    for edited, old, new in [(package / "words.py", "'apple'", "'banana'"),  # two imports down, by package name
                             (package / "rules.py", "prefer='pear'", "prefer='fig'")]:
        edited.write_text(edited.read_text().replace(old, new))
        after = keys()
        assert all(a != b for a, b in zip(after, before)), edited
        before = after
    other = import_function(specs[2]).__class__("fig")
    assert code_fingerprint(other) != code_fingerprint(import_function(specs[2]))  # the object's own data
    # Builtins by their names and what they are bound to; C objects by how they pickle; a slotted object's state.
    import operator
    import re as regex

    assert code_fingerprint(len) == code_fingerprint(len) != code_fingerprint(abs)
    assert code_fingerprint(str.lower) != code_fingerprint(str.upper)
    assert code_fingerprint("A".startswith) != code_fingerprint("B".startswith)
    assert code_fingerprint(operator.itemgetter(1)) != code_fingerprint(operator.itemgetter(2))
    judge = import_function(specs[0])
    assert code_fingerprint(functools.partial(judge, prefer={"a", "b"})) == \
        code_fingerprint(functools.partial(judge, prefer={"b", "a"}))  # a set by content: the same in every process
    assert code_fingerprint(functools.partial(judge, prefer=regex.compile("a"))) != \
        code_fingerprint(functools.partial(judge, prefer=regex.compile("b")))
    (package / "slotted.py").write_text("class Prefer:\n    __slots__ = ('word',)\n\n    def __init__(self, word):\n"
                                        "        self.word = word\n\n    def __call__(self, p, a, b):\n"
                                        "        return 'A' if self.word in a else 'B'\n")
    from mypkg.slotted import Prefer

    assert code_fingerprint(Prefer("x")) != code_fingerprint(Prefer("y"))
    # Found by reading files, never by importing: a package that fails on import (needs a GPU) is not run.
    (tmp_path / "gpu_only").mkdir()
    (tmp_path / "gpu_only" / "__init__.py").write_text("raise RuntimeError('needs a GPU')\n")
    (tmp_path / "gpu_only" / "kernels.py").write_text("K = 1\n")
    (package / "rules.py").write_text((package / "rules.py").read_text() + "\nif False:\n    from gpu_only.kernels "
                                      "import K\n")
    before = code_fingerprint(import_function(specs[0]))
    (tmp_path / "gpu_only" / "kernels.py").write_text("K = 2\n")
    assert code_fingerprint(import_function(specs[0])) != before  # followed, by reading
    # The standard library and installed packages are not followed (json's files are not in the key).
    from alignkit.core import code_digest

    walked: dict = {}
    code_digest._walk(package / "words.py", walked)
    assert set(walked) == {(package / "words.py").resolve()}  # it imports json and torch: neither is followed
    # A function typed into a notebook: its text and the plain globals it reads, set in another cell.
    import linecache

    cell = "def typed(prompt, a, b):\n    return 'A' if PREFER in a else 'B'\n"
    linecache.cache["<cell-1>"] = (len(cell), None, cell.splitlines(True), "<cell-1>")
    namespace = {"PREFER": "apple", "__name__": "__main__"}
    exec(compile(cell, "<cell-1>", "exec"), namespace)
    first = code_fingerprint(namespace["typed"])
    assert code_fingerprint(namespace["typed"]) == first
    namespace["PREFER"] = "banana"
    assert code_fingerprint(namespace["typed"]) != first
    # Bound data that is not plain: this process only.
    unreadable = functools.partial(import_function(specs[0]), prefer=object())
    assert code_fingerprint(unreadable) == code_fingerprint(unreadable)
    script = ("import functools, sys; sys.path.insert(0, sys.argv[1]); from alignkit.core.code_digest import "
              "code_fingerprint; from mypkg.rules import judge; print(code_fingerprint(judge), "
              "code_fingerprint(functools.partial(judge, prefer=object())))")
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == runs[1][0] == code_fingerprint(import_function(specs[0]))  # another process: the same key
    assert runs[0][1] != runs[1][1]  # unreadable: never another process's


def test_the_alpaca_eval_rule_annotations_key_on_the_rule(tmp_path, monkeypatch):
    from alignkit.evals import alpacaeval_annotate
    from alignkit.modeling import presets

    template = tmp_path / "prompt.txt"
    template.write_text("{instruction}")
    annotators = {"a": {"prompt_template": str(template)}}
    cache, decoder = alpacaeval_annotate.annotation_store(tmp_path, "cfg", annotators, None, 1)
    assert decoder is alpacaeval_annotate.rule_completions
    assert alpacaeval_annotate.annotation_store(tmp_path, "cfg", annotators, None, 1)[0] == cache
    edit_as_read(monkeypatch, presets, b"WORDS = ", b"WORDS  = ")  # the tiny rule's module, as if edited
    assert alpacaeval_annotate.annotation_store(tmp_path, "cfg", annotators, None, 1)[0] != cache


def test_a_rule_s_key_follows_its_data_file_the_module_it_runs_and_not_its_path(tmp_path, monkeypatch):
    """Found by the cache audit of session 28, each a stale hit or a miss:
    - a python: judge reading its preference from a file beside it (`Path(__file__).parent / "pref.json"`): the file
      edited, its old verdicts were reused ("slot A wins 100%" from a judge now saying B);
    - a python:FILE.py judge importing `helper`, with a helper.py beside it and another on PYTHONPATH: the key read
      the one beside it, the run imported the other (its folder was not on sys.path), and an edit of the one that
      ran was not seen;
    - one judge (or local model) named by two spellings of its path was judged (generated) again from nothing."""
    import types

    from alignkit.core.code_digest import code_fingerprint
    from alignkit.core.config import LabelSettings
    from alignkit.feedback.judge import PythonJudge, import_function
    from alignkit.feedback.label_records import Source
    from alignkit.feedback.labeling import _generator_identities

    judges, elsewhere = tmp_path / "j", tmp_path / "pp"
    judges.mkdir()
    elsewhere.mkdir()
    (judges / "reads.py").write_text("import json, pathlib\n\n\ndef judge(prompt, a, b):\n    return json.loads("
                                     "(pathlib.Path(__file__).parent / 'pref.json').read_text())['prefer']\n")
    (judges / "pref.json").write_text('{"prefer": "A"}')
    (judges / "rule.py").write_text("from helper import PREFER\n\n\ndef judge(prompt, a, b):\n    return PREFER\n")
    (judges / "helper.py").write_text("PREFER = 'A'\n")
    (elsewhere / "helper.py").write_text("PREFER = 'B'\n")
    # The judges' folder on the path too, behind the other helper (the review of session 28): still the one beside it.
    monkeypatch.setattr(sys, "path", [str(elsewhere), str(judges.resolve()), *sys.path])
    monkeypatch.delitem(sys.modules, "helper", raising=False)
    monkeypatch.delitem(sys.modules, "reads", raising=False)
    monkeypatch.delitem(sys.modules, "rule", raising=False)

    reads = import_function(f"python:{judges / 'reads.py'}:judge")
    before = code_fingerprint(reads)
    (judges / "pref.json").write_text('{"prefer": "B"}')
    assert reads("p", "a", "b") == "B" and code_fingerprint(reads) != before

    # A string too long for a file name (a prompt in Chinese: over 255 bytes) stopped the key in an OSError; a log
    # the rule writes, named in its code, would change its key at every run: neither counts (the review of session 28).
    (judges / "talks.py").write_text('PROMPT = "' + "请回答" * 40 + ' (e.g. A or B)"\n\n\ndef judge(prompt, a, b):\n'
                                     '    open(__file__[:-3] + ".log", "a").write("judged")\n    return "A"\n'
                                     'LOG = "talks.log"\n')
    talks = import_function(f"python:{judges / 'talks.py'}:judge")
    first = code_fingerprint(talks)
    assert talks("p", "a", "b") == "A" and (judges / "talks.log").is_file() and code_fingerprint(talks) == first

    rule = import_function(f"python:{judges / 'rule.py'}:judge")
    assert rule("p", "a", "b") == "A"  # the helper beside it, the one its key reads
    monkeypatch.chdir(tmp_path)
    spelled = [PythonJudge(f"python:{where}:judge").identity() for where in
               (judges / "rule.py", "j/rule.py", "./j/../j/rule.py")]
    assert spelled[0] == spelled[1] == spelled[2]
    from alignkit.feedback.pointwise import Grader  # label.py --mode pointwise's graders alike

    (judges / "grade.py").write_text("def grade(prompt, answer):\n    return 1.0\n")
    graded = [Grader(LabelSettings(mode="pointwise", judge=f"python:{where}:grade")).identity() for where in
              (judges / "grade.py", "j/grade.py", "./j/../j/grade.py")]
    assert graded[0] == graded[1] == graded[2]

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    run = types.SimpleNamespace(settings=LabelSettings(model_id="model"), backend="transformers")
    keys = {json.dumps(_generator_identities(run, Source(spec, spec, "local", 0))[0], sort_keys=True)
            for spec in ("model", "./model", str(tmp_path / "model"))}
    assert len(keys) == 1
