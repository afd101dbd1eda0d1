from __future__ import annotations

import builtins
import json
import os
import re
import sys
from dataclasses import dataclass, field

import pytest

from alignkit.core.args import ConfigError, is_notebook, parse_config, redact, setting
from alignkit.core.saved_settings import config_to_dict, save_config


@dataclass
class Base:
    model_name: str = setting("tiny-model", help="model id")
    hub_token: str | None = setting(None, help="Hub token")
    token_env: str = setting("HF_TOKEN", help="name of the env var holding the token")


@dataclass
class Cfg(Base):  # inherited + `from __future__ import annotations` (string annotations)
    preset: str | None = setting(None, help="named preset")
    seed: int = setting(42, help="random seed")
    dpo_beta: float = setting(0.5, help="KL penalty, 50% is a lot")
    bf16: bool = setting(False, help="use bf16")
    max_steps: int | None = setting(None, help="stop after N steps")
    run_name: str | None = setting(None, help="run name")
    target_modules: list[str] = setting(default_factory=lambda: ["q_proj"], help="LoRA targets")
    lrs: list[float] = setting(default_factory=list, help="learning rates")
    loss_type: str = setting("sigmoid", help="DPO loss", choices=["sigmoid", "ipo", "hinge"])
    max_new_tokens: int = setting(128, help="generation length")
    output_dir: str = setting("out", help="where to write")


PRESETS = {"small": {"seed": 1, "dpo_beta": 0.2, "max_steps": 10}, "big": {"max_steps": 1000}}
FIELDS = [
    "model_name", "hub_token", "token_env", "preset", "seed", "dpo_beta", "bf16", "max_steps", "run_name",
    "target_modules", "lrs", "loss_type", "max_new_tokens", "output_dir",
]
SECRET = "hf_fakeSECRET123456"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Isolate every test: no field env vars, no stray kernel markers, cwd without a .env file.

    load_dotenv writes into os.environ behind monkeypatch's back, so restore the whole mapping afterwards."""
    saved = dict(os.environ)
    for name in [*FIELDS, "config"]:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(f"ALIGNKIT_{name.upper()}", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.delattr(builtins, "get_ipython", raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved)


def parse(args=(), **kw):
    kw.setdefault("env_file", None)
    return parse_config(Cfg, args=list(args), **kw)


def write(path, text):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- layering
def test_defaults_and_types():
    cfg = parse()
    assert cfg == Cfg()
    assert cfg.target_modules == ["q_proj"] and cfg.lrs == []


def test_each_layer_overrides_the_one_below(tmp_path, monkeypatch):
    # seven fields; field k is set by layers 0..k, so it must end up with layer k's value
    presets = {"p": {"seed": 1, "dpo_beta": 0.1, "max_steps": 1, "run_name": "preset", "model_name": "preset",
                     "output_dir": "preset"}}
    env_file = write(tmp_path / "my.env", "DPO_BETA=0.2\nMAX_STEPS=2\nALIGNKIT_RUN_NAME=dotenv\n"
                                          "ALIGNKIT_MODEL_NAME=dotenv\nALIGNKIT_OUTPUT_DIR=dotenv\n")
    monkeypatch.setenv("MAX_STEPS", "3")
    monkeypatch.setenv("ALIGNKIT_RUN_NAME", "env")
    monkeypatch.setenv("ALIGNKIT_MODEL_NAME", "env")
    monkeypatch.setenv("ALIGNKIT_OUTPUT_DIR", "env")
    monkeypatch.setenv("PRESET", "p")
    recipe = write(tmp_path / "recipe.yaml", "model_name: yaml\noutput_dir: yaml\nrun_name: yaml\n")
    cfg = parse(["--config", recipe, "--model_name", "flag", "--output_dir", "flag"],
                env_file=env_file, presets=presets, overrides={"output_dir": "override"})
    assert cfg.seed == 1  # preset beats dataclass default 42
    assert cfg.dpo_beta == 0.2  # .env beats preset
    assert cfg.max_steps == 3  # env beats .env
    assert cfg.run_name == "yaml"  # yaml beats env
    assert cfg.model_name == "flag"  # flag beats yaml
    assert cfg.output_dir == "override"  # overrides beat flags
    assert cfg.preset == "p" and cfg.loss_type == "sigmoid"  # untouched fields keep defaults


def test_flag_and_env_var_give_the_same_config(monkeypatch):
    from_flag = parse(["--dpo_beta", "0.1"])
    monkeypatch.setenv("DPO_BETA", "0.1")
    from_env = parse()
    assert from_flag == from_env and from_env.dpo_beta == 0.1


def test_real_env_beats_dotenv_and_dotenv_beats_defaults(tmp_path, monkeypatch):
    write(tmp_path / ".env", "ALIGNKIT_SEED=7\nALIGNKIT_RUN_NAME=from_file\nHF_TOKEN=dotenv_token_value\n")
    monkeypatch.setenv("ALIGNKIT_RUN_NAME", "from_env")
    cfg = parse_config(Cfg, args=[])  # default env_file=".env" in cwd (tmp_path)
    assert cfg.seed == 7 and cfg.run_name == "from_env"
    assert os.environ["HF_TOKEN"] == "dotenv_token_value"  # secrets become visible to libraries
    assert os.environ["ALIGNKIT_RUN_NAME"] == "from_env"  # override=False


def test_a_dotenv_edited_between_two_runs_in_one_process_is_read_as_it_is_now(tmp_path, monkeypatch):
    """A notebook's first cell run again: the first read of .env stayed in os.environ, so an edit (or removal) of
    a value did nothing, and the stale value counted as a real environment variable, above the file."""
    monkeypatch.setenv("ALIGNKIT_RUN_NAME", "real")  # the user's own variable: never touched
    write(tmp_path / ".env", "ALIGNKIT_SEED=3\nALIGNKIT_RUN_NAME=from_file\n")
    assert (parse_config(Cfg, args=[]).seed, parse_config(Cfg, args=[]).run_name) == (3, "real")
    write(tmp_path / ".env", "ALIGNKIT_SEED=5\n")
    assert parse_config(Cfg, args=[]).seed == 5
    write(tmp_path / ".env", "")
    assert parse_config(Cfg, args=[]).seed == 42 and "ALIGNKIT_SEED" not in os.environ
    assert os.environ["ALIGNKIT_RUN_NAME"] == "real"


def test_env_file_none_and_missing_file(tmp_path):
    write(tmp_path / ".env", "ALIGNKIT_SEED=7\n")
    assert parse_config(Cfg, args=[], env_file=None).seed == 42
    assert parse_config(Cfg, args=[], env_file=str(tmp_path / "nope.env")).seed == 42


def test_config_file_via_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CONFIG", write(tmp_path / "r.yaml", "seed: 5\ntarget_modules: [a, b]\nlrs: 1e-4,2e-4\n"))
    cfg = parse()
    assert cfg.seed == 5 and cfg.target_modules == ["a", "b"] and cfg.lrs == [1e-4, 2e-4]


def test_preset_is_only_a_default(tmp_path):
    cfg = parse(["--preset", "small", "--seed", "3"], presets=PRESETS)
    assert (cfg.seed, cfg.dpo_beta, cfg.max_steps) == (3, 0.2, 10)
    yaml_file = write(tmp_path / "r.yaml", "preset: big\n")
    assert parse(["--config", yaml_file], presets=PRESETS).max_steps == 1000
    assert parse(overrides={"preset": "big"}, presets=PRESETS).max_steps == 1000
    assert parse(["--preset", "small"], overrides={"preset": "big"}, presets=PRESETS).max_steps == 1000


def test_a_preset_s_step_count_yields_to_the_epochs_the_user_gave(tmp_path):
    """rl.py's tiny preset sets max_steps 60, which the Trainer counts over epochs: `--num_train_epochs 1` trained
    60 steps (about 4 epochs) without a word (found by an audit). The user's epochs win, from any layer; their own
    --max_steps still wins over their epochs, as in the Trainer."""
    from alignkit.core.config import RLSettings
    from alignkit.modeling import presets

    def rl(*args, **kw):
        return parse_config(RLSettings, env_file=None, presets={"tiny": presets.defaults("rl")},
                            args=["--preset", "tiny", *args], **kw)

    assert rl().max_steps == 60
    assert (rl("--num_train_epochs", "1").max_steps, rl("--num_train_epochs", "1").num_train_epochs) == (-1, 1.0)
    assert rl("--config", write(tmp_path / "r.yaml", "num_train_epochs: 2\n")).max_steps == -1
    assert rl(overrides={"num_train_epochs": 2}).max_steps == -1
    assert rl("--num_train_epochs", "1", "--max_steps", "5").max_steps == 5


# ---------------------------------------------------------------- value forms
@pytest.mark.parametrize("args, expected", [
    (["--bf16"], True), (["--bf16", "false"], False), (["--bf16", "YES"], True), (["--bf16", "0"], False),
    (["--bf16=on"], True), (["--bf16", "off"], False), ([], False),
])
def test_bool_flag_forms(args, expected):
    assert parse(args).bf16 is expected


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("no", False), ("OFF", False)])
def test_bool_env_forms(monkeypatch, value, expected):
    monkeypatch.setenv("ALIGNKIT_BF16", value)
    assert parse().bf16 is expected


def test_bool_flag_followed_by_other_flag():
    cfg = parse(["--bf16", "--seed", "3"])
    assert cfg.bf16 is True and cfg.seed == 3


@pytest.mark.parametrize("args", [
    ["--target_modules", "q_proj", "v_proj"], ["--target_modules", "q_proj,v_proj"],
    ["--target_modules=q_proj,v_proj"], ["--target_modules", "q_proj,", "v_proj"],
])
def test_list_flag_forms(args):
    assert parse(args).target_modules == ["q_proj", "v_proj"]


def test_list_from_env_yaml_and_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_TARGET_MODULES", "a, b")
    monkeypatch.setenv("ALIGNKIT_LRS", "0.1,1")
    cfg = parse()
    assert cfg.target_modules == ["a", "b"] and cfg.lrs == [0.1, 1.0]
    yaml_file = write(tmp_path / "r.yaml", "target_modules: c,d\nlrs: [0.5, 2]\n")
    cfg = parse(["--config", yaml_file])
    assert cfg.target_modules == ["c", "d"] and cfg.lrs == [0.5, 2.0]
    assert parse(overrides={"lrs": [3]}).lrs == [3.0]


def test_none_for_optionals(monkeypatch, tmp_path):
    monkeypatch.setenv("MAX_STEPS", "5")
    assert parse(["--max_steps", "None"]).max_steps is None
    assert parse(["--max_steps", "7"]).max_steps == 7
    assert parse(["--run_name", "null"], overrides={}).run_name is None
    assert parse(["--run_name", "x"]).run_name == "x"
    yaml_file = write(tmp_path / "r.yaml", "max_steps: null\n")
    assert parse(["--config", yaml_file]).max_steps is None
    assert parse(["--model_name", "none"]).model_name == "none"  # non-optional str keeps the text


def test_equals_form_and_dashes():
    cfg = parse(["--dpo_beta=0.25", "--seed=3", "--model_name=a=b", "--loss-type", "ipo"])
    assert (cfg.dpo_beta, cfg.seed, cfg.model_name, cfg.loss_type) == (0.25, 3, "a=b", "ipo")


def test_negative_number_is_a_value():
    assert parse(["--dpo_beta", "-0.5"]).dpo_beta == -0.5


def test_overrides_values_are_converted():
    cfg = parse(overrides={"dpo_beta": "0.3", "seed": 4, "bf16": "yes"})
    assert (cfg.dpo_beta, cfg.seed, cfg.bf16) == (0.3, 4, True)


# ---------------------------------------------------------------- notebooks
def test_notebook_argv_is_ignored(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    assert is_notebook()
    assert parse_config(Cfg, env_file=None) == Cfg()
    assert parse_config(Cfg, args=["--seed", "3"], env_file=None).seed == 3
    assert parse_config(Cfg, overrides={"seed": 9}, env_file=None).seed == 9


def test_notebook_detected_by_get_ipython(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python", "-f", "x"])
    monkeypatch.setattr(builtins, "get_ipython", lambda: None, raising=False)
    assert is_notebook() and parse_config(Cfg, env_file=None) == Cfg()


def test_ipython_s_run_of_a_script_reads_its_flags(monkeypatch, tmp_path):
    """`%run sft.py --preset tiny` in a kernel and `ipython sft.py -- --preset tiny` hand the script its flags as
    sys.argv: they were dropped without a word and the script ran on its defaults (the notebook audit). A kernel
    launched by another .py than ipykernel_launcher (python -m ipykernel, Spyder, PyCharm, Colab) or an IPython
    console keeps its argv to itself: its cells are no file of argv[0]'s (the review of session 32)."""
    import runpy

    monkeypatch.setattr(builtins, "get_ipython", lambda: None, raising=False)
    script = tmp_path / "train.py"
    script.write_text("from dataclasses import dataclass\nfrom alignkit.core.args import parse_config\n"
                      "@dataclass\nclass Cfg:\n    seed: int = 1\nseed = parse_config(Cfg, env_file=None).seed\n")
    monkeypatch.setattr(sys, "argv", [str(script), "--seed", "5"])
    assert is_notebook() and runpy.run_path(str(script))["seed"] == 5
    launcher = tmp_path / "ipykernel" / "__main__.py"
    launcher.parent.mkdir()
    launcher.write_text("")
    for argv in ([str(launcher), "-f", "/tmp/kernel.json"], ["/usr/bin/ipython", "--no-banner"]):
        monkeypatch.setattr(sys, "argv", argv)
        cell = {}
        exec(compile(script.read_text(), "/tmp/ipykernel_1/2750.py", "exec"), cell)  # a cell, as a kernel runs it
        assert cell["seed"] == 1
        other = {}
        exec(compile(script.read_text(), str(script), "exec"), other)  # a script, not the one argv names
        assert other["seed"] == 1


def test_a_refusal_under_ipython_s_run_is_one_line(tmp_path):
    """`%run script.py` (and `ipython script.py`) shows a script's errors itself, with IPython's traceback: a user
    error there is the one line a script says (the notebook audit of session 32), and the kernel lives on."""
    import subprocess

    from conftest import ROOT

    (tmp_path / "script.py").write_text("from alignkit.core.errors import UserError\nraise UserError('bad thing: fix')\n")
    (tmp_path / "cells.ipy").write_text("%run script.py --flag\nprint('lives on')\n")
    env = {k: v for k, v in os.environ.items() if k != "ALIGNKIT_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=nocolor", "cells.ipy"],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    shown = (done.stdout + done.stderr).strip().splitlines()
    assert "error: bad thing: fix" in shown and "lives on" in shown and "Traceback" not in done.stdout + done.stderr


def test_script_uses_sys_argv(monkeypatch):
    assert not is_notebook()
    monkeypatch.setattr(sys, "argv", ["train.py", "--seed", "11"])
    assert parse_config(Cfg, env_file=None).seed == 11
    monkeypatch.setattr(sys, "argv", ["train.py", "-f", "kernel.json"])
    with pytest.raises(ConfigError, match="-f"):
        parse_config(Cfg, env_file=None)


# ---------------------------------------------------------------- errors
def test_unknown_flag_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown setting: --dpo_bta \(on the command line; did you mean --dpo_beta"):
        parse(["--dpo_bta", "0.1"])
    with pytest.raises(ConfigError, match="unknown setting: --zzz") as e:
        parse(["--zzz"])
    assert "did you mean" not in str(e.value)


def test_every_unknown_key_of_every_layer_in_one_message(tmp_path):
    recipe = write(tmp_path / "recipe.yaml", "sed: 1\nrun_nam: x\nseed: 2\n")
    with pytest.raises(ConfigError) as e:
        parse(["--config", recipe, "--dpo_bta", "0.1", "--zzz", "--seed", "3"], overrides={"lr": 1})
    message = str(e.value)
    for name in ("sed", "run_nam", "--dpo_bta", "--zzz", "'lr'"):
        assert name in message, name
    assert message.count("unknown setting") == 1 and "\n" not in message


@pytest.mark.parametrize("args, pattern", [
    (["--seed", "abc"], r"--seed: 'abc' is not an int"),
    (["--dpo_beta", "abc"], r"invalid value for --dpo_beta: 'abc' is not a float"),
    (["--bf16", "maybe"], r"--bf16: 'maybe' is not a boolean"),
    (["--loss_type", "dpo"], r"--loss_type: 'dpo' is not one of sigmoid, ipo, hinge"),
    (["--lrs", "0.1,x"], r"--lrs: 'x' is not a float"),
    (["--seed", "1", "2"], r"--seed expects one value"),
    (["--seed"], r"--seed expects one value"),
    (["stray"], r"unexpected argument 'stray'"),
])
def test_bad_flag_values(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse(args)


@pytest.mark.parametrize("name, value, pattern", [
    ("ALIGNKIT_SEED", "abc", r"env var ALIGNKIT_SEED: 'abc' is not an int"),
    ("DPO_BETA", "abc", r"env var DPO_BETA: 'abc' is not a float"),
    ("ALIGNKIT_BF16", "2", r"env var ALIGNKIT_BF16: '2' is not a boolean"),
    ("ALIGNKIT_LOSS_TYPE", "dpo", r"env var ALIGNKIT_LOSS_TYPE: 'dpo' is not one of"),
])
def test_bad_env_values(monkeypatch, name, value, pattern):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=pattern):
        parse()


def test_bad_dotenv_value_names_the_file(tmp_path):
    env_file = write(tmp_path / "my.env", "ALIGNKIT_SEED=abc\n")
    with pytest.raises(ConfigError, match=r"env var ALIGNKIT_SEED \(from .*my.env\)"):
        parse(env_file=env_file)


def test_an_alignkit_variable_no_script_reads_is_reported_one_for_another_script_is_named(tmp_path, monkeypatch,
                                                                                          alignkit_log):
    """ALIGNKIT_DPO_BTA=0.5 was silently ignored: the run went on at the default beta. A variable no script reads
    is an unknown setting now, with the closest one; a variable of another script (a shell exporting
    ALIGNKIT_DPO_BETA for a whole pipeline while sft.py runs) is only named in one log line."""
    from alignkit.core.config import DPOSettings, SFTSettings

    monkeypatch.setenv("ALIGNKIT_DPO_BTA", "0.5")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))  # alignkit's own, no setting: fine
    for cls in (DPOSettings, SFTSettings):
        with pytest.raises(ConfigError, match=r"^unknown setting: ALIGNKIT_DPO_BTA \(in the environment; did you "
                                              r"mean ALIGNKIT_DPO_BETA\?\)"):
            parse_config(cls, args=[], env_file=None)
    monkeypatch.delenv("ALIGNKIT_DPO_BTA")
    monkeypatch.setenv("ALIGNKIT_DPO_BETA", "0.2")
    assert parse_config(DPOSettings, args=[], env_file=None).dpo_beta == 0.2
    monkeypatch.setenv("ALIGNKIT_BETA", "0.3")  # TRL's name: dpo.py reads it, so sft.py passes it by
    parse_config(SFTSettings, args=[], env_file=None)
    assert "not read by this script (settings of other alignkit scripts): ALIGNKIT_BETA, ALIGNKIT_DPO_BETA" in \
        alignkit_log.text
    env_file = write(tmp_path / "my.env", "ALIGNKIT_MAX_STEP=5\n")
    with pytest.raises(ConfigError, match=r"ALIGNKIT_MAX_STEP \(in .*my.env; did you mean ALIGNKIT_MAX_STEPS\?\)"):
        parse_config(SFTSettings, args=[], env_file=env_file)


def test_a_setting_that_holds_another_script_s_flags_takes_them_as_a_shell_user_writes_them():
    """rlaif.py --label_args "--parallel 32": the value starts with -- and was read as a flag with no value."""
    from alignkit.core.config import RLAIFSettings

    s = parse_config(RLAIFSettings, args=["--label_args", "--parallel 32 --both_orders false", "--evaluate_args",
                                          "--parallel 8", "--rounds", "2"], env_file=None)
    assert (s.label_args, s.evaluate_args, s.rounds) == ("--parallel 32 --both_orders false", "--parallel 8", 2)
    assert parse_config(RLAIFSettings, args=["--label_args=--parallel 4"], env_file=None).label_args == "--parallel 4"
    with pytest.raises(ConfigError, match="--label_args expects one value, got none"):
        parse_config(RLAIFSettings, args=["--label_args"], env_file=None)


@pytest.mark.parametrize("text, pattern", [
    ("seed: abc\n", r"recipe.yaml: key seed: 'abc' is not an int"),
    ("dpo_beta: abc\n", r"recipe.yaml: key dpo_beta: 'abc' is not a float"),
    ("bf16: maybe\n", r"recipe.yaml: key bf16: 'maybe' is not a boolean"),
    ("loss_type: dpo\n", r"recipe.yaml: key loss_type: 'dpo' is not one of"),
    ("seed: true\n", r"key seed: True is not an int"),
    ("dpo_bta: 0.1\n", r"unknown setting: dpo_bta \(in .*recipe.yaml; did you mean dpo_beta"),
    ("- seed\n", r"recipe.yaml: top level must be a mapping"),
    ("seed: [1\n", r"recipe.yaml: line 2, column 1: not valid YAML \(expected ',' or '\]'"),
])
def test_bad_yaml(tmp_path, text, pattern):
    recipe = write(tmp_path / "recipe.yaml", text)
    with pytest.raises(ConfigError, match=pattern):
        parse(["--config", recipe])


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        parse(["--config", str(tmp_path / "nope.yaml")])


def test_empty_yaml_is_fine(tmp_path):
    assert parse(["--config", write(tmp_path / "r.yaml", "")]) == Cfg()


def test_unknown_preset_lists_known_ones(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*big, small"):
        parse(["--preset", "huge"], presets=PRESETS)
    monkeypatch.setenv("PRESET", "huge")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        parse(presets=PRESETS)


def test_bad_overrides():
    with pytest.raises(ConfigError, match=r"unknown setting: 'sed' \(in overrides; did you mean seed"):
        parse(overrides={"sed": 1})
    with pytest.raises(ConfigError, match=r"overrides key 'seed': 'x' is not an int"):
        parse(overrides={"seed": "x"})


def test_post_init_errors_become_config_errors():
    @dataclass
    class Checked:
        lr: float = 1e-5

        def __post_init__(self):
            if self.lr <= 0:
                raise ValueError("lr must be positive")

    with pytest.raises(ConfigError, match="lr must be positive"):
        parse_config(Checked, args=["--lr", "-1"], env_file=None)
    assert parse_config(Checked, args=["--lr", "2"], env_file=None).lr == 2.0


def test_a_checked_value_is_named_where_it_was_set(tmp_path, monkeypatch):
    """A notebook's overrides={"learning_rate": -1} was refused as "--learning_rate must be >= 0": a flag the
    notebook has not. The message names the value where it was set: an overrides key, a recipe's key, a variable,
    a flag; other flags the message names stay flags."""
    @dataclass
    class Checked:
        lr: float = 1e-5
        steps: int = 1

        def __post_init__(self):
            if self.lr <= 0:
                raise ValueError(f"--lr must be > 0, got {self.lr} (--steps {self.steps} is fine)")

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: -2\n")
    for how, said in (({"overrides": {"lr": -1}}, "overrides key 'lr'"), ({"args": ["--lr", "-1"]}, "--lr"),
                      ({"args": ["--config", str(recipe)]}, f"{recipe}: key lr")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(said)} must be > 0, got -\d\.0 \(--steps 1 is fine\)$"):
            parse_config(Checked, env_file=None, **{"args": [], **how})
    monkeypatch.setenv("ALIGNKIT_LR", "-3")
    with pytest.raises(ConfigError, match=r"^env var ALIGNKIT_LR must be > 0, got -3.0"):
        parse_config(Checked, args=[], env_file=None)


def test_required_field_missing():
    @dataclass
    class Req:
        dataset: str
        n: int = 1

    with pytest.raises(ConfigError, match=r"missing required option --dataset.*DATASET"):
        parse_config(Req, args=[], env_file=None)
    assert parse_config(Req, args=["--dataset", "d"], env_file=None).dataset == "d"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_user_errors_share_one_base_and_debug_is_no_setting(capsys):
    from alignkit.core.data import DataError
    from alignkit.core.errors import UserError
    from alignkit.core.hub import HubUnreachable

    assert all(issubclass(e, UserError) for e in (ConfigError, DataError, HubUnreachable))
    # --debug belongs to the error reporting (alignkit.core.errors): accepted anywhere, never a setting.
    assert parse(["--seed", "7", "--debug"]) == parse(["--debug", "--seed", "7"]) == parse(["--seed", "7"])
    with pytest.raises(SystemExit):
        parse(["--help"])
    assert "--debug" in capsys.readouterr().out


# ---------------------------------------------------------------- help
def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"], prog="train_dpo", description="Train with DPO.", presets=PRESETS)
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.index("train_dpo") < out.index("Train with DPO.")
    for name in FIELDS:
        assert f"--{name}" in out and f"env: ALIGNKIT_{name.upper()}" in out
    for default in ["default: 42", "default: 0.5", "default: false", "default: q_proj", "default: sigmoid",
                    "default: none", "default: HF_TOKEN"]:
        assert default in out, default
    assert "sigmoid,ipo,hinge" in out and "50% is a lot" in out and "--config" in out


def test_help_shows_preset_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--preset", "small", "-h"], presets=PRESETS)
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "default: 1;" in out and "default: 0.2;" in out and "default: 10;" in out
    assert "default: 42" not in out


def test_reward_py_s_help_says_it_drops_pairs_longer_than_max_length(capsys):
    """--max_length's shared help said "longer ones are truncated" in reward.py's --help too, but TRL's RewardTrainer
    drops a longer pair. reward.py's settings class says so (its help_texts), the other scripts' keep the field's."""
    from alignkit.core.config import RewardSettings, SFTSettings

    def said(cls):
        with pytest.raises(SystemExit):
            parse_config(cls, args=["--help"], env_file=None)
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        return out[out.index("--max_length"):].split(" --", 1)[0]

    reward = said(RewardSettings)
    assert "truncated" not in reward and "TRL's RewardTrainer drops a longer pair" in reward, reward
    assert "default: 1024; env: ALIGNKIT_MAX_LENGTH" in reward  # the field's type and default, as before
    assert "longer ones are truncated" in said(SFTSettings)
    assert "max_length" not in vars(RewardSettings)  # the shared field, not a copy


def test_rl_and_rlaif_help_say_the_shared_settings_they_refuse(capsys):
    """rl.py --help described --dataset_test_split, --dataset_mixture and --eval_steps as they work in sft.py and
    dpo.py, and rl.py refuses all three (rlaif.py the first two): its help says so."""
    from alignkit.core.config import RLAIFSettings, RLSettings

    def said(cls, name):
        with pytest.raises(SystemExit):
            parse_config(cls, args=["--help"], env_file=None)
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        return out[out.index(f"--{name} "):].split(" --", 1)[0]

    for name in ("dataset_test_split", "dataset_mixture", "eval_steps"):
        assert "refused by rl.py" in said(RLSettings, name), said(RLSettings, name)
    for name in ("dataset_test_split", "dataset_mixture"):
        assert "refused by rlaif.py" in said(RLAIFSettings, name), said(RLAIFSettings, name)


# ---------------------------------------------------------------- saving and secrets
def test_save_config_redacts_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MY_SERVICE_API_KEY", "sk-otherSECRET99")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to be treated as a secret
    cfg = parse(["--hub_token", "hub_tokenSECRET", "--run_name", f"run-{SECRET}",
                 "--target_modules", "q", "sk-otherSECRET99", "--output_dir", "abc"])
    path = tmp_path / "deep" / "dir" / "config.json"
    save_config(cfg, path)
    text = path.read_text()
    assert SECRET not in text and "hub_tokenSECRET" not in text and "sk-otherSECRET99" not in text
    data = json.loads(text)
    assert data["hub_token"] == "***"
    assert data["run_name"] == "run-***"
    assert data["target_modules"] == ["q", "***"]
    assert data["token_env"] == "HF_TOKEN"  # names a variable, not a secret
    assert data["max_new_tokens"] == 128  # a count, not a credential
    assert data["output_dir"] == "abc" and data["seed"] == 42 and data["bf16"] is False

    # A crash while the next config is written leaves this one whole (a resume reads it), never half of each.
    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_config(parse(["--run_name", "next"]), path)
    assert json.loads(path.read_text()) == data and [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_config_to_dict_leaves_unset_secret_fields_and_is_json_safe():
    data = config_to_dict(parse())
    assert data["hub_token"] is None
    assert set(data) == set(FIELDS)
    json.dumps(data)


def test_redact(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandbkey12345")
    monkeypatch.setenv("DB_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("UNRELATED", "plainvalue123")
    assert redact("k=wandbkey12345 p=hunter2hunter2 u=plainvalue123") == "k=*** p=*** u=plainvalue123"
    # credentials in a URL, whatever the variables say; no scheme (git@host, an e-mail address) is no credential
    assert redact("http://alice:pw12@h:1/v1?model=m&api_key=abc123") == "http://alice:***@h:1/v1?model=m&api_key=***"
    assert redact("https://hf_abcdef@huggingface.co/x") == "https://***@huggingface.co/x"
    assert redact("git@github.com:a/b and me@example.com") == "git@github.com:a/b and me@example.com"
    # a variable a setting names as holding a key is a secret, whatever it is called
    from alignkit.core import config

    monkeypatch.setenv("REDACT_TEST_JUDGE", "myjudgekey12345")
    assert redact("key myjudgekey12345") == "key myjudgekey12345"
    parse_config(config.LabelSettings, args=["--judge_api_key_env", "REDACT_TEST_JUDGE"], env_file=None)
    assert redact("key myjudgekey12345") == "key ***"


def test_secret_field_names(monkeypatch):
    @dataclass
    class Names:
        tokenizer_name: str = "gpt2-tokenizer"
        pad_token: str = "<pad>"
        wandb_api_key: str = "k"
        db_password: str = ""
        extra: dict = field(default_factory=lambda: {"client_secret": "s3", "x": "y"})

    data = config_to_dict(Names())
    assert data == {"tokenizer_name": "gpt2-tokenizer", "pad_token": "<pad>", "wandb_api_key": "***",
                    "db_password": "", "extra": {"client_secret": "***", "x": "y"}}


def test_preset_default_from_dataclass():
    @dataclass
    class WithPreset:
        preset: str = "small"
        seed: int = 0

    presets = {"small": {"seed": 1}}
    assert parse_config(WithPreset, args=[], env_file=None, presets=presets).seed == 1
    assert parse_config(WithPreset, args=["--preset", ""], env_file=None, presets=presets).seed == 0
    with pytest.raises(ConfigError, match=r"preset 'small' sets unknown field 'sed'"):
        parse_config(WithPreset, args=[], env_file=None, presets={"small": {"sed": 1}})


# ---------------------------------------------------------------- shared settings groups, by composition
def test_judge_and_hub_settings_are_one_group_each_with_one_default_and_one_check():
    from dataclasses import fields

    from alignkit.core import config

    judged = [config.LabelSettings, config.MTBenchSettings, config.PairwiseSettings, config.AlpacaEvalSettings,
              config.RLSettings]
    for cls in judged:
        assert issubclass(cls, config.JudgeEndpointSettings), cls
        defaults = {f.name: f.default for f in fields(cls)}
        assert defaults["max_retries"] == 5 and defaults["request_timeout"] == 120.0, cls
        if cls is not config.AlpacaEvalSettings:  # alpaca_eval's annotator config sets its own answer length
            assert defaults["judge_max_tokens"] == 2048, cls
    for cls, needed in [(config.DPOSettings, {}), (config.SFTSettings, {}), (config.LabelSettings, {}),
                        (config.MergeSettings, {"adapter_dir": "x"}), (config.RewardSettings, {})]:
        assert issubclass(cls, config.HubPushSettings), cls
        assert cls(push_to_hub=True, **needed).hub_repo_id is None  # named at the push, after the run (as TRL)
        assert cls(push_to_hub=True, hub_repo_id="me/x", **needed).hub_repo_id == "me/x"
    with pytest.raises(ConfigError, match="max_retries >= 0"):
        parse_config(config.LabelSettings, args=["--max_retries", "-1"], env_file=None)


def test_loader_settings_of_another_model_keep_how_models_load_but_not_the_revision():
    from alignkit.core.config import GenerationSettings, LabelSettings, ModelSettings, loader_settings

    s = LabelSettings(model_id="org/a", revision="v2", gguf_file="a.gguf", dtype="fp16", quantization="none",
                      chat_template="t.jinja", max_model_len=512)
    other = loader_settings(s, "org/b")
    assert type(other) is GenerationSettings and other.model_id == "org/b"
    assert (other.revision, other.gguf_file) == (None, None)  # they name files of org/a
    assert (other.dtype, other.quantization, other.chat_template, other.max_model_len) == ("fp16", "none",
                                                                                        "t.jinja", 512)
    same = loader_settings(s, "org/a")
    assert (same.revision, same.gguf_file) == ("v2", "a.gguf")
    judge = loader_settings(s, "org/judge", revision="main", chat_template=None)
    assert (judge.revision, judge.chat_template) == ("main", None)
    assert type(loader_settings(ModelSettings(), "x")) is ModelSettings


# ---------------------------------------------------------------- package structure
def test_the_package_docstring_names_every_module_and_only_presets_code_imports_the_preset():
    import ast
    from pathlib import Path

    import alignkit

    package = Path(alignkit.__file__).parent
    # Modules live in one subpackage per pipeline stage; the package root holds only the logger (__init__).
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py"]
    files = {p.stem: p for p in package.glob("*/*.py") if p.stem != "__init__"}
    assert len(files) == len(list(package.glob("*/*.py"))) - len(list(package.glob("*/__init__.py")))  # unique
    assert [m for m in sorted(files) if not re.search(rf"\b{m}\b", alignkit.__doc__)] == []
    for stage in sorted({p.parent for p in files.values()}):  # and each subpackage's docstring names its own
        doc = ast.get_docstring(ast.parse((stage / "__init__.py").read_text())) or ""
        assert [m for m, p in files.items() if p.parent == stage and not re.search(rf"\b{m}\b", doc)] == []
    # The MT-Bench code and the reference cache serve every model: no demo preset in their imports.
    for name in ("mtbench", "refcache"):
        tree = ast.parse(files[name].read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {(node.module or "").rpartition(".")[2]} | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name.rpartition(".")[2] for a in node.names}
        assert not imported & {"presets", "smol"}, name


def test_whole_list_values_keep_their_commas_from_every_layer(monkeypatch):
    @dataclass
    class Asks:
        prompts: list[str] = setting([], "prompts", whole=True)
        tags: list[str] = setting([], "split at commas")

    got = parse_config(Asks, args=["--prompts", "Hello, who are you?", "Hi", "--tags", "a,b", "--prompts=x, y"],
                       env_file=None)
    assert got.prompts == ["Hello, who are you?", "Hi", "x, y"] and got.tags == ["a", "b"]
    monkeypatch.setenv("ALIGNKIT_PROMPTS", "Name three fruits, please.")
    assert parse_config(Asks, args=[], env_file=None).prompts == ["Name three fruits, please."]
    from alignkit.evals.evaluation import parse_command

    command, settings = parse_command(["vibes", "--model_id", "m", "--prompts", "Hello, who are you?", "Hi"])
    assert command == "vibes" and settings.prompts == ["Hello, who are you?", "Hi"]


def test_a_value_refused_under_trls_name_names_it_too():
    """`--beta -1` said "dpo_beta must be > 0": a name the user never typed."""
    from alignkit.core.config import DPOSettings

    with pytest.raises(ConfigError, match=r"^dpo_beta must be > 0, got -1.0 \(dpo_beta is TRL's beta\)$"):
        parse_config(DPOSettings, ["--beta", "-1"], env_file=None)
    with pytest.raises(ConfigError, match=r"^dpo_beta must be > 0, got -1.0$"):  # typed as alignkit names it
        parse_config(DPOSettings, ["--dpo_beta", "-1"], env_file=None)


def test_a_settings_cell_that_fails_anywhere_in_a_notebook_leaves_the_kernel_without_settings(tmp_path, monkeypatch,
                                                                                                capsys):
    """A settings cell whose parse passed and whose preflight failed (--push_to_hub over a local base, a missing
    token) left the new settings in the kernel: the cells below trained on them, and the push failed at the end.
    Session 27 guarded the parse and preflight; a failure in the cell's other lines (presets.ensure, the launch's
    refusal, evaluate.py's backend) still left them. Any error in a cell that calls parse_config (or parse_command)
    takes its settings out, earlier ones of the same class with them; a cell that does not leaves them, and so
    does a settings cell that ran through."""
    from alignkit.core import errors
    from alignkit.core.config import DPOSettings, SFTSettings
    from alignkit.core.launch import establish_launch

    earlier = SFTSettings(model_id="old", dataset_id="d.jsonl", output_dir=str(tmp_path))
    kernel = type("Shell", (), {"user_ns": {}})()
    names = kernel.user_ns
    names.update(settings=earlier, kept=earlier, other=1, dpo=DPOSettings(model_id="m"), establish_launch=establish_launch,
                 parse_config=lambda cls, **kw: cls(model_id="new", dataset_id="d.jsonl", output_dir=str(tmp_path)),
                 SFTSettings=SFTSettings)
    monkeypatch.setattr(builtins, "get_ipython", lambda: kernel, raising=False)  # inside a cell
    monkeypatch.setattr("IPython.get_ipython", lambda: kernel)  # after it: IPython takes it out of builtins then
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # a launch config's: refused for an fp32 run

    def run_cell(source):
        result = type("Result", (), {"error_in_exec": None, "info": type("Info", (), {"raw_cell": source})})()
        try:
            exec(compile(source, "<cell>", "exec"), names)
        except Exception as error:  # as IPython's run_code keeps it
            result.error_in_exec = error
        errors._settings_cell_failed(result)  # IPython's post_run_cell event
        return result.error_in_exec

    assert "mixed_precision bf16" in str(run_cell("x = other"
                                                  "\nestablish_launch(kept, 'sft.py')"))  # no settings cell
    assert names["settings"] is earlier and names["kept"] is earlier
    failed = run_cell("settings = parse_config(SFTSettings, overrides={})\nestablish_launch(settings, 'sft.py')")
    assert "accelerate launch asks for mixed_precision bf16" in str(failed)
    assert {"settings", "kept"}.isdisjoint(names) and names["other"] == 1 and "dpo" in names
    assert errors._GONE["settings"] == errors.FORGOTTEN  # taken out: not "never set", though the cell sets it too
    errors._show_in_cell(kernel, NameError, NameError("name 'settings' is not defined", name="settings"), None)
    assert capsys.readouterr().err.startswith("error: settings: the settings cell stopped with an error")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert run_cell("settings = parse_config(SFTSettings, overrides={})\nestablish_launch(settings, 'sft.py')") is None
    assert names["settings"].model_id == "new" and "settings" not in errors._GONE  # a later NameError is its own
    # A parse that fails where the cell's text does not show it (a helper of the user's; a `%%time` cell, whose magic
    # keeps the error from IPython): parse_config itself takes the settings out (the review of session 28).
    from alignkit.core.args import parse_config

    names["setup"] = lambda: parse_config(SFTSettings, args=[], overrides={"max_steps": "5x"}, env_file=None)
    with pytest.raises(ConfigError, match="max_steps"):
        exec(compile("settings = setup()", "<cell>", "exec"), names)
    assert "settings" not in names
    # A fresh kernel whose first settings cell fails: `settings` never was, so nothing was taken out, and the cells
    # below showed a NameError traceback (Python's rule took it for a typo of the imported SFTSettings; the notebook
    # audit of session 35). Only what the cell's own code binds, not a name read in a target nor a function's local.
    errors._GONE.clear()
    names.clear()
    names.update(SFTSettings=SFTSettings, table={},
                 parse_config=lambda cls, **kw: (_ for _ in ()).throw(ConfigError("unknown setting: 'max_step'")))
    cell = ("overrides = {}\nsettings, other_name = parse_config(SFTSettings, overrides=overrides), 1\n"
            "import os as system\ntable[key] = 1\ndef helper():\n    inner = 1\nfor step in []: pass\n"
            "rows = [row for row in [1] if (kept := row)]\nsums = {k: v for k, v in {}.items()}")
    assert "max_step" in str(run_cell(cell))
    # Not a comprehension's loop variables (its own in Python 3: `row`, `k`, `v` were never the cell's), but a :=
    # in one binds the cell's (`kept`).
    assert errors._GONE == dict.fromkeys(["settings", "other_name", "system", "helper", "step", "rows", "kept", "sums"],
                                         errors.NEVER_SET)
    errors._show_in_cell(kernel, NameError, NameError("name 'settings' is not defined", name="settings"), None)
    assert capsys.readouterr().err == ("error: settings: the settings cell stopped with an error (see its line) before "
                                       "it set settings: fix it and run it, then the cells from there down\n")
    assert run_cell("settings = 1") is None and "settings" not in errors._GONE  # set since: its own again
    errors._GONE.clear()


def test_a_refusal_that_embeds_text_of_several_lines_is_said_on_one_line(monkeypatch, capsys):
    """A message that quotes another's text of several lines (an endpoint's body, a rule's exception) is one
    `error:` line wherever it is said: a script's exit, IPython's display, a notebook cell (rlaif's steps read the
    last `error:` line, and cut the rest: the close of session 33)."""
    from alignkit.core import errors
    from alignkit.core.errors import UserError, error_line

    error = UserError('the judge failed (body: {\n  "detail": "no such model"\n}\n): fix --judge_model\n')
    assert error_line(error) == 'error: the judge failed (body: { "detail": "no such model" } ): fix --judge_model'
    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    assert error._render_traceback_() == [error_line(error)]
    with pytest.raises(SystemExit) as stop:
        errors._report(UserError, error, None)
    assert stop.value.code == errors.EXIT_USER_ERROR
    assert capsys.readouterr().err == error_line(error) + "\n"
    assert error_line(UserError(" \n ")) == "error: "
