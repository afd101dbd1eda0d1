"""TRL's and the alignment-handbook's vocabulary, spoken by the training scripts' settings.

A TRL command line or an alignment-handbook recipe runs through sft.py/dpo.py unchanged. Besides alignkit's own
field names, a settings class with `trl_configs` (e.g. ("DPOConfig",)) accepts:

- aliases: TRL's name for a setting alignkit has under its own (`beta` is `dpo_beta`, `model_name_or_path` is
  `model_id`, `load_in_4bit: true` is `quantization 4bit`, `hub_model_id` is `hub_repo_id`, ...), `ALIASES`;
- pass-through: every other field of the TRL config the script runs, typed from TRL's own dataclass
  (`dataclasses.fields(trl.DPOConfig)`), collected into `trainer_overrides` and handed to TRL as it is;
- the handbook's recipe keys: `dataset_mixer`/`dataset_splits` (its older data format) and TRL's `datasets`
  become a `dataset_mixture` (alignkit.core.mixture_formats), and a recipe's `output_dir` is the run's own folder
  (TRL's meaning);
- keys that cannot apply (`NOT_APPLIED`), each named with the reason and what to use instead, all in one
  warning; keys that are nothing at all are all refused in one message (alignkit.core.args).

The tables (ALIASES, NOT_APPLIED, REFUSED, ...) are in alignkit.core.trl_tables and TRL's field types in
alignkit.core.trl_types; this module reads settings with them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from alignkit import logger
from alignkit.core.args import _FALSE, _TRUE, ConfigError, _show
from alignkit.core.mixture_formats import mixture_from_mixer, mixture_from_trl
from alignkit.core.trl_tables import (BESIDE_MIXTURE, DATASET_KWARGS_GONE, _ANY, _BOOL_WORDS, _MAPPINGS,
                                      _MIXTURE_HAS_ITS_OWN, _MODEL_AND_SCRIPT, _RENAMED, _RENAMED_VALUES,
                                      _SAME_MEANING, _TRL_DEFAULTS_UNDER_OTHER_NAMES, _TRL_NONE_DEFAULTS, _TRL_ONLY,
                                      _TRL_RECIPE_NAMES, ALIASES, DROPPED, DTYPE_SYNONYMS, NOT_APPLIED, REFUSED,
                                      REFUSED_IN, SKIP, _bool, _model_dtype, _Weak, for_configs, refusal)
from alignkit.core.trl_types import _members, cli_kind, same_meaning, trl_choices, trl_fields, trl_value, unset

__all__ = ["ALIASES", "DTYPE_SYNONYMS", "NOT_APPLIED", "REFUSED", "Vocabulary"]


# ---------------------------------------------------------------- the vocabulary
def _mapping_keys(value) -> list:
    """The keys of a --trainer_overrides value as a layer holds it (a mapping, or its JSON/YAML text); none where
    it is no mapping (the setting's own conversion names that)."""
    import yaml

    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return []
    return list(value) if isinstance(value, Mapping) else []


class Vocabulary:
    """alignkit.core.args' second vocabulary for a settings class with `trl_configs`."""

    def __init__(self, settings_cls):
        self.config_names = tuple(settings_cls.trl_configs)
        self.takes_mixture = getattr(settings_cls, "takes_mixture", True)  # reward.py, rl.py, rlaif.py: one split
        self.passthrough = {n: t for n, t in trl_fields(self.config_names).items()}
        self.model_and_script = trl_fields(_MODEL_AND_SCRIPT)
        self.trl_style = False  # a TRL-only name (model_name_or_path, dataset_name) was given on the command line
        # A TRL field's bad value, by name, until a later layer sets it again (a flag fixes a recipe's value):
        # parse_config raises what is left once every layer is read.
        self.deferred: dict[str, ConfigError] = {}
        self.trl_dataset = False  # TRL's dataset_name was given, in any layer
        self.use_peft = False  # TRL's use_peft was given, in any layer
        self.reads_test_split = getattr(settings_cls, "reads_test_split", False)
        self._spelled: dict[str, dict[str, str]] = {}  # {layer: {setting: the alias that set it}}, for `spelled`

    def spelled(self, where: str, name: str) -> str:
        """The name a setting was given by in the layer `where` (translate's): TRL's alias that set it there (`beta`
        for dpo_beta), so a bad value names the flag or key typed, else `name`."""
        return self._spelled.get(where, {}).get(name, name)

    def default_note(self, field: str, ours: str) -> str:
        """"; TRL's default: X" for --help when TRL's default for `field` (under its name or a same-meaning alias)
        differs from alignkit's, shown as `ours`; else ""."""
        import trl

        if field in _TRL_NONE_DEFAULTS:  # TRL's None: a library's own choice, said in words
            value, said = _TRL_NONE_DEFAULTS[field]
            return f"; TRL's default: {said}" if ours != value else ""
        names = [field, *(a for a in self.aliases_of(field) if ALIASES[a].convert is None)]
        for config in (*self.config_names, *_MODEL_AND_SCRIPT):
            by_name = {f.name: f for f in dataclasses.fields(getattr(trl, config))}
            for f in (by_name[n] for n in names if n in by_name):
                theirs = getattr(f.default, "value", f.default)  # an enum default shows as its value
                if f.default is dataclasses.MISSING or theirs is None or isinstance(theirs, (dict, list)):
                    return ""
                theirs = str(theirs).lower() if isinstance(theirs, bool) else str(theirs)
                return f"; TRL's default: {theirs}" if theirs != ours else ""
        value, said = _TRL_DEFAULTS_UNDER_OTHER_NAMES.get(field, (None, ""))
        try:
            same = float(ours) == value if isinstance(value, float) else ours == value
        except ValueError:
            same = False
        return f"; TRL's default: {said}" if said and not same else ""

    def aliases_of(self, field: str) -> list[str]:
        return [a for a, alias in ALIASES.items() if alias.target == field]

    def cli_types(self) -> dict:
        out = {n: cli_kind(t) for n, t in self.passthrough.items()}
        out.update({n: bool if t is bool or bool in _members(t) else str for n, t in self.model_and_script.items()})
        out.update({n: a.kind for n, a in ALIASES.items()})
        out.update({old: out[new] for old, new in _RENAMED.items() if new in self.passthrough})
        for n in NOT_APPLIED:  # typed as TRL types them where it still has them (or had them: TRL 0.x, transformers 4)
            out.setdefault(n, bool if n in ("overwrite_output_dir", "use_liger_loss", "auto_insert_empty_system_msg")
                           else str)
        for n in REFUSED:  # TRL scripts' own arguments (reward_funcs) too: named, not "unknown"
            out.setdefault(n, list[str] if n == "reward_funcs" else str)
        for n in DROPPED:  # an older TRL's fields, where this script's config lacks them
            out.setdefault(n, bool if n in ("reference_free", "generate_during_eval", "force_use_ref_model",
                                            "use_logits_to_keep") else str)
        out.update(dataset_mixer=dict, dataset_splits=list[str], dataset_configs=list[str], datasets=str,
                   test_split_size=float, streaming=bool)
        return out

    def env_names(self, fields) -> list[str]:
        """The TRL names this script reads from ALIGNKIT_<NAME>: an alias of a setting it does not have (TRL's
        `beta` in sft.py) is another script's variable, passed by like ALIGNKIT_DPO_BETA."""
        return [n for n in self.cli_types() if n not in ALIASES or self._applies(n, fields)]

    @staticmethod
    def _applies(name: str, fields) -> bool:
        return ALIASES[name].target in fields or ALIASES[name].everywhere

    def field_of(self, name: str, fields) -> tuple[str | None, str | None]:
        """(the setting TRL's `name` sets, its --trainer_overrides key or None); (None, None) for a key that sets
        none alone (a mixture's, one not applied)."""
        if name in ALIASES and self._applies(name, fields):
            return ALIASES[name].target, None
        name = _RENAMED.get(name, name)
        return ("trainer_overrides", name) if name in self.passthrough else (None, None)

    def why_not(self, name: str, fields) -> str | None:
        """Why TRL's `name` is no setting of this script: it names one the script does not have (`beta` in
        sft.py), said so instead of suggesting the very name back."""
        if name in ALIASES and not self._applies(name, fields):
            return f"TRL's name for --{ALIASES[name].target}, which this script does not have"
        return None

    def own_name(self, name: str, fields) -> str | None:
        """This script's own setting that another script's `name` is (kto.py's and rl.py's beta for dpo.py's
        dpo_beta: TRL's name, an alias there), or None."""
        return next((a for a, alias in ALIASES.items() if alias.target == name and a in fields), None)

    def suggestable(self, names, fields) -> list[str]:
        """`names` less those this script names as not applied or refuses at any value, or has no setting for (an
        unknown setting's "did you mean" points to one it takes)."""
        said = {*(n for n in NOT_APPLIED if n not in ALIASES or not self._applies(n, fields)), *REFUSED,
                *(n for n in REFUSED_IN if refusal(n, object(), self.config_names)),
                *(n for n in DROPPED if n not in self.passthrough), *(a for a in ALIASES if not self._applies(a, fields))}
        return [n for n in names if n in fields or n not in said]

    def translate(self, layer: Mapping, where: str, fields, label) -> tuple[dict, list[str], list[tuple[str, str]]]:
        """(the layer in alignkit's field names, its unknown keys, (key, why) of the keys not applied); `label(key)`
        names a value of this layer in an error."""
        out, unknown, notes, extra, chosen = {}, [], [], {}, set()
        # The older handbook recipes' names for what TRL names otherwise now (zephyr-7b-beta's dpo/config_qlora.yaml),
        # in a recipe, on the command line or in the environment alike
        renamed = [k for k in layer if k in _RENAMED and _RENAMED[k] in self.passthrough]
        for key in renamed:
            if _RENAMED[key] in layer:
                raise ConfigError(f"{label(key)} and {label(_RENAMED[key])} name one setting ({key} is the older "
                                  f"name of {_RENAMED[key]}): pass one")
            logger.info(f"{label(key)} is read as {_RENAMED[key]}, its name in TRL now")
        layer = {(_RENAMED[k] if k in renamed else k): v for k, v in layer.items()}
        self.trl_dataset |= "dataset_name" in layer
        self.use_peft |= "use_peft" in layer
        if "dataset_mixer" in layer or "dataset_splits" in layer or "dataset_configs" in layer:
            if "dataset_mixer" not in layer and "dataset_configs" in layer:  # configurations of nothing
                raise ConfigError(f"{label('dataset_configs')} lists the configurations of dataset_mixer's datasets, "
                                  "and there is no dataset_mixer: add it, or use --dataset_config with --dataset_id")
            if "dataset_mixer" not in layer:
                unknown.append("dataset_splits")  # splits of nothing
            else:
                mixer = layer["dataset_mixer"]
                if isinstance(mixer, str) and mixer.strip().startswith("{"):
                    try:
                        mixer = json.loads(mixer)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"invalid value for {label('dataset_mixer')}: not valid JSON ({e}); pass a "
                                          "JSON object of dataset id: fraction, e.g. "
                                          "'{\"HuggingFaceH4/ultrafeedback_binarized\": 1.0}'") from None
                elif isinstance(mixer, str):
                    mixer = {mixer: 1.0}
                out["dataset_mixture"] = mixture_from_mixer(mixer, layer.get("dataset_splits"), label("dataset_mixer"),
                                                            label("dataset_splits"), layer.get("dataset_configs"),
                                                            label("dataset_configs"))
        if "datasets" in layer:  # TRL's own mixture, as DatasetMixtureConfig reads it from a YAML config
            out["dataset_mixture"] = mixture_from_trl(layer["datasets"], layer.get("test_split_size"),
                                                      label("datasets"))
            if str(layer.get("streaming", False)).lower() not in ("false", "none"):
                notes.append(("streaming", NOT_APPLIED["dataset_streaming"][1]))
        for pair in (("bf16", "fp16"), ("load_in_4bit", "load_in_8bit")):  # TRL refuses both: so does alignkit
            if all(str(layer.get(key)).strip().lower() in _TRUE for key in pair):
                raise ConfigError(f"{label(pair[0])} and {label(pair[1])} are both true: pass one (the last one "
                                  "silently won)")
        for key, raw in layer.items():
            if key in ("dataset_mixer", "dataset_splits", "dataset_configs") or (
                    key in ("datasets", "test_split_size", "streaming") and "datasets" in layer):
                continue
            if key in fields:
                out[key] = raw
            elif key in ALIASES and self._applies(key, fields):
                alias = ALIASES[key]
                try:
                    value = alias.convert(raw, label(key)) if alias.convert else raw
                    self.deferred.pop(key, None)
                except ConfigError as error:  # a later layer may set it again (use_liger_kernel: maybe in a recipe)
                    self.deferred[key] = error
                    continue
                weak = isinstance(value, _Weak)
                # TRL's bf16/fp16 beside a ModelConfig dtype are two of TRL's settings (_one_dtype says which wins)
                if value is not SKIP and not weak and alias.target in layer and key not in ("bf16", "fp16") and not (
                        unset(raw) or unset(layer[alias.target]) or same_meaning(value, layer[alias.target])):
                    raise ConfigError(f"{label(key)} and {label(alias.target)} name one setting ({key} is TRL's name "
                                      f"for {alias.target}) with two values: pass one")
                if value is not SKIP and alias.target not in layer and not (weak and alias.target in chosen):
                    out[alias.target] = value.value if weak else value  # alignkit's own name wins in one layer
                    self._spelled.setdefault(where, {})[alias.target] = key
                    if not weak:
                        chosen.add(alias.target)
                self.trl_style |= key in _TRL_ONLY and where == "the command line"
            elif key in REFUSED:
                raise ConfigError(f"{label(key)} has no effect in alignkit: {REFUSED[key]}; drop it")
            elif key in NOT_APPLIED:
                same, reason = NOT_APPLIED[key]
                same = same(self.config_names) if callable(same) else same  # the script's own (lora_task_type)
                if same is _ANY or str(raw).lower() not in {str(v).lower() for v in
                                                            (same if isinstance(same, tuple) else (same,))}:
                    notes.append((key, for_configs(reason, self.config_names)))
            elif key in self.passthrough:
                if key in _BOOL_WORDS and str(raw).strip().lower() in _TRUE | _FALSE:  # TRL's bool spelling
                    raw = _BOOL_WORDS[key][str(raw).strip().lower() in _TRUE]
                if (new := _RENAMED_VALUES.get(key, {}).get(str(raw).strip())) is not None:
                    logger.info(f"{label(key)} {str(raw).strip()} is read as {new}, its name in TRL now")
                    raw = new
                try:
                    extra[key] = self._passthrough_value(key, raw, label)
                    self.deferred.pop(key, None)
                except ConfigError as error:
                    self.deferred[key] = error
                    continue
                if why := refusal(key, extra[key], self.config_names):  # sync_ref_model: TRL fails after the load
                    # a later layer may set it back (the handbook's smollm3 apo.yaml says padding_free: true)
                    back = ("" if where in ("the command line", "overrides")
                            else f", or set it back with --{key} {str(REFUSED_IN[key][1]).lower()}")
                    self.deferred[key] = ConfigError(f"{label(key)} {raw} has no effect in alignkit: {why}; drop it"
                                                     f"{back}")
                kwargs = extra[key] if key == "dataset_kwargs" and isinstance(extra[key], Mapping) else {}
                if gone := [k for k in kwargs if k != "skip_prepare_dataset"]:  # TRL takes them and reads none
                    notes.append((key, DATASET_KWARGS_GONE.format(keys=", ".join(gone))))
                    extra[key] = {k: v for k, v in kwargs.items() if k not in gone}
                    if not extra[key]:
                        del extra[key]
            elif key in DROPPED:  # an older TRL's field: said as such, not "unknown setting" with a wrong near name
                refused, why = DROPPED[key][0], for_configs(DROPPED[key][1], self.config_names)
                if refused and not (unset(raw) or str(raw).strip().lower() in _FALSE | {"0.0", ""}):
                    raise ConfigError(f"{label(key)} {raw}: {why.replace('ALPHA', str(raw))}")
                if not refused:
                    notes.append((key, why))
            else:
                unknown.append(key)
        for key in _mapping_keys(layer.get("trainer_overrides")):  # set there: an earlier bad value goes unused
            if key not in ALIASES:  # an alias there bypasses its conversion: its bad value stays refused
                self.deferred.pop(key, None)
        for alias in [a for a in self.deferred if a in ALIASES and ALIASES[a].target in layer]:
            self.deferred.pop(alias)  # alignkit's own name in this layer wins, before or after the alias
        self._one_dtype(layer, out, notes, label)
        if extra:
            out["trainer_overrides"] = {**extra, **(out.get("trainer_overrides") or {})}
        return out, unknown, notes

    def _passthrough_value(self, key: str, raw, label):
        value = trl_value(raw, self.passthrough[key], label(key))
        allowed = trl_choices(self.config_names).get(key)
        if allowed and isinstance(value, str) and value not in allowed:  # TRL checks it only later
            raise ConfigError(f"invalid value for {label(key)}: {value!r} is not one of "
                              f"{', '.join(map(str, allowed))}")
        if key in _MAPPINGS and isinstance(value, str):  # typed dict | str, but a str fails in TRL
            raise ConfigError(f"invalid value for {label(key)}: {raw!r} is not a mapping; write a JSON object "
                              f"or a YAML mapping, e.g. {_MAPPINGS[key]}")
        return value

    @staticmethod
    def _one_dtype(layer: Mapping, out: dict, notes: list[tuple[str, str]], label) -> None:
        """TRL loads the model in torch_dtype and trains under bf16/fp16 autocast; alignkit has one --dtype for both.
        A torch_dtype that names a dtype is it, whichever key comes first; a bf16/fp16 beside it that asks for
        another precision is named in a note."""
        model_dtype = _model_dtype(layer.get("torch_dtype"))
        if "torch_dtype" not in layer or "dtype" in layer or model_dtype is SKIP or isinstance(model_dtype, _Weak):
            return
        out["dtype"] = model_dtype
        ours = DTYPE_SYNONYMS.get(str(model_dtype).lower(), str(model_dtype).lower())
        for key in ("bf16", "fp16"):
            if key in layer and _bool(layer[key], label(key)) and ours != key:
                notes.append((key, f"alignkit computes in one dtype, and torch_dtype {model_dtype} names it; pass "
                                   f"--dtype {key} to load and train in {key}"))

    def finish(self, values: dict, given: dict, recipe_keys: set, raw_recipe_keys: set = frozenset(),
               preset_keys: set = frozenset()) -> None:
        """What TRL's names mean together, once every layer is read.

        - A recipe's (or a TRL command line's) output_dir is the run's own folder, as in TRL, unless a run_name
          says otherwise: it becomes alignkit's output_dir (the parent) and run_name (the folder's name). So is a
          --output_dir that overrides a recipe's (it meant the parent, then the run's folder once a TRL-only
          name joined it on the line).
        - `eval_strategy: no` (or `do_eval: false` alone, or a TRL command line or TRL/handbook recipe naming
          neither nor eval_steps: TRL's default is no) asks for no evaluation: no --eval_split share is held out of
          the training rows unless --eval_split itself gives one (TRL and the handbook train on them all), or, where
          only TRL's default says no (neither eval_strategy nor do_eval named), the preset does.
        - Settings in TRL's names (a TRL command line, a TRL or handbook recipe) without use_peft are refused (TRL
          would fine-tune every weight), and without load_in_4bit/load_in_8bit load the model unquantized, as TRL.
        - TRL's `dataset_name` without a split trains on TRL's default split, `train`; where evaluation is asked for
          and neither --eval_split nor --dataset_test_split is set (nor a dataset_mixture), it evaluates on the
          dataset's `test` split where it has one (--dataset_test_split auto), as TRL's scripts do.
        - A --dataset_id beside a dataset_mixture is named as unused, as TRL's scripts name dataset_name beside
          datasets, and so are a split and configuration it replaces (_mixed_over).
        """
        # A TRL command line, or a TRL or handbook recipe (in TRL's names, no run_name of its own), that names no
        # evaluation asks for none: TRL's eval_strategy default is "no" (the zephyr-141b ORPO recipe lost 4 of its 64
        # rows to a share; `--model_name_or_path M --dataset_name D` lost 5% of them).
        trl_recipe = bool(raw_recipe_keys & _TRL_RECIPE_NAMES) and "run_name" not in raw_recipe_keys
        if self.trl_dataset and "dataset_split" in values and "dataset_split" not in given:
            values["dataset_split"] = "train"  # TRL's dataset_train_split default (so not among the defaults named)
        if self.trl_style or raw_recipe_keys & _TRL_RECIPE_NAMES:
            self._trl_defaults(values, given, preset_keys)
        overrides = values.get("trainer_overrides") or {}
        strategy = str(getattr(overrides.get("eval_strategy"), "value", overrides.get("eval_strategy"))).lower()
        no_eval = strategy == "no" or (str(overrides.get("do_eval")).lower() == "false" and strategy == "none")
        implicit = ((trl_recipe or self.trl_style) and strategy == "none"
                    and not {"do_eval", "eval_steps"} & set(overrides) and "eval_steps" not in given)
        # A preset's share yields to an evaluation asked away in so many words, as any preset default to a setting.
        kept = "eval_split" in given or ("eval_split" in preset_keys and not no_eval)
        if (no_eval or implicit) and "eval_split" in values and not kept:
            if implicit and values["eval_split"]:
                logger.info("eval_split 0: the settings in TRL's names name no evaluation (TRL's eval_strategy "
                            "default is no), so every row trains; --eval_split 0.05 holds a share out")
            values["eval_split"] = 0
        # TRL's scripts train on all of dataset_name's train split and evaluate on its `test` split
        # (ScriptArguments.dataset_test_split): a share of train held out instead evaluated on other rows.
        chosen = set(given) | set(preset_keys)
        # Only where evaluation is asked for by eval_strategy, as TRL evaluates (eval_strategy != "no"): a
        # dataset_name read from the environment or alongside eval_steps alone keeps the share (the review of s32).
        if (self.trl_dataset and self.reads_test_split and values.get("eval_split") and "dataset_test_split" in values
                and strategy not in ("none", "no") and not values.get("dataset_mixture")
                and not {"dataset_test_split", "eval_split"} & chosen):
            values["dataset_test_split"] = "auto"  # the data loader says which it found (alignkit.core.mixture)
        if values.get("dataset_mixture") and self.takes_mixture:  # the others refuse a mixture (train_settings)
            self._mixed_over(values, given)
        source = given.get("output_dir")
        trl_meaning = source == "recipe" or (source in ("cli", "overrides")
                                             and (self.trl_style or "output_dir" in recipe_keys))
        if "run_name" in given and trl_meaning:  # TRL's run_name names the tracker's run, not the folder
            logger.info(f"run_name {values['run_name']}: the run goes to {Path(values['output_dir'], values['run_name'])}"
                        f" (alignkit's run folder), not to output_dir {values['output_dir']} itself as in TRL; "
                        "leave run_name out for that")
        if "run_name" in given or not trl_meaning:
            return
        folder = Path(values["output_dir"])
        if folder.name:
            values["output_dir"], values["run_name"] = str(folder.parent), folder.name

    @staticmethod
    def _mixed_over(values: dict, given: dict) -> None:
        """A dataset_mixture beside one dataset's settings. A dataset_id is named as unused (where it was set), as
        TRL's scripts name dataset_name beside datasets, and an eval_split beside a mixture with test rows. Its split
        and configuration settings from an earlier layer (a recipe's dataset_split under a --dataset_mixture on the
        command line) go with it, named too; from the mixture's own layer or a later one they are refused in one
        line by the settings (alignkit.core.mixture.check_beside_mixture)."""
        layers = ("env", "recipe", "cli", "overrides")
        places = {"env": "from the environment", "recipe": "in the recipe", "cli": "on the command line",
                  "overrides": "in overrides"}
        by = given.get("dataset_mixture")
        unused = [f"dataset_id {values['dataset_id']} ({places[given['dataset_id']]})"] if "dataset_id" in given else []
        for key, meant in BESIDE_MIXTURE.items():
            source = given.get(key)  # a default or a preset's stays (a run recorded it: --resume auto compares it)
            if key not in values or not (source and by and layers.index(source) < layers.index(by)):
                continue
            if values[key] not in meant:
                unused.append(f"{key} {values[key]} ({places[source]})")
            values[key] = meant[0]
            del given[key]
        mixture = values["dataset_mixture"] if isinstance(values["dataset_mixture"], dict) else {}
        tested = mixture.get("test_split_size") or any(isinstance(d, dict) and d.get("test")
                                                        for d in mixture.get("datasets") or [])
        if tested and "eval_split" in given and values.get("eval_split"):  # the mixture's test rows are held out
            unused.append(f"eval_split {values['eval_split']} ({places[given['eval_split']]})")
        if unused:
            instead = ". To train on that dataset, pass --dataset_mixture none" if "dataset_id" in given else ""
            logger.warning(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: the "
                           f"dataset_mixture is, and names each dataset's split, configuration and held-out rows"
                           f"{instead}")

    def _trl_defaults(self, values: dict, given: dict, preset_keys) -> None:
        """Settings in TRL's names mean what TRL makes of them: without use_peft TRL fine-tunes every weight, which
        alignkit does not do (refused, rather than training an adapter nobody asked for); without load_in_4bit or
        load_in_8bit TRL loads the model unquantized (alignkit's --quantization auto would pick 4-bit on CUDA)."""
        if not self.use_peft and "adapter" not in given:
            lota = ", or --adapter lota for a sparse full-rank delta" if "adapter" in values else ""
            raise ConfigError("use_peft is not set: with TRL's names (model_name_or_path, dataset_name, a handbook "
                              "recipe) TRL would fine-tune every weight, and alignkit trains LoRA/QLoRA adapters only; "
                              f"add --use_peft (use_peft: true in a recipe) to train a LoRA adapter{lota}")
        if "quantization" in values and "quantization" not in given and "quantization" not in preset_keys:
            values["quantization"] = "none"  # TRL's default; load_in_4bit: true (or --quantization 4bit) is QLoRA
        # alignkit's own defaults stand where the settings leave a field out (they are for LoRA, not TRL's full
        # fine-tuning): one line names each that differs from TRL's, so a TRL user sees what changed.
        differ = [f"{k} {_show(values[k])} (TRL: {note.removeprefix('; TRL' + chr(39) + 's default: ')})"
                  for k in sorted(values) if k not in given and k not in preset_keys and k not in _SAME_MEANING
                  and not (values.get("dataset_mixture") and k in _MIXTURE_HAS_ITS_OWN)
                  and (note := self.default_note(k, _show(values[k])))]
        if differ:
            logger.info(f"alignkit's defaults where the settings leave them out and TRL's differ: {', '.join(differ)}")

    def help_text(self, fields=()) -> str:
        refused = {*REFUSED, *(n for n in REFUSED_IN if refusal(n, object(), self.config_names))}  # at any value
        names = ", ".join(sorted(set(self.passthrough) - set(ALIASES) - set(fields) - refused - set(NOT_APPLIED)))
        refused = ", ".join(sorted(refused))
        aliases = ", ".join(f"--{a} (--{x.target}{': ' + x.note if x.note else ''})" for a, x in ALIASES.items()
                            if a not in fields and self._applies(a, fields))  # kto.py's beta is its own
        aliases += "".join(f", --{old} (--{new}: its older name)" for old, new in _RENAMED.items()
                           if new in self.passthrough)
        said = lambda reason: for_configs(reason, self.config_names)  # noqa: E731  (how this trainer cuts)
        ignored = "\n".join([f"  {k}: {said(reason)}" for k, (_, reason) in NOT_APPLIED.items()  # one a line: findable
                              if k not in ALIASES or not self._applies(k, fields)]
                             + [f"  {k}: {said(reason)}{' (refused when set)' if refused_ else ''}"
                                for k, (refused_, reason) in DROPPED.items()
                                if k not in self.passthrough and k not in fields])
        return ("alignkit's defaults are for QLoRA on one GPU, as the seed project's; where TRL's differ, a flag "
                f"shows TRL's.\n\nTRL's names: {aliases}.\n\nEvery other field of TRL's {'/'.join(self.config_names)} is accepted "
                f"under its TRL name and type and handed to TRL as it is (collected in --trainer_overrides): "
                f"{names}.\n\nalignment-handbook recipes: dataset_mixture (id, config, split, columns, weight; "
                "test_split_size, seed), the older dataset_mixer + dataset_splits (+ dataset_configs), and TRL's own datasets (path, name, "
                "split, columns, fraction) + test_split_size; a recipe's output_dir is the "
                f"run's own folder; an inline chat_template works.\n\nNamed but not applied (a run setting one says "
                f"so in one line and goes on, unless refused):\n{ignored}\n\nRefused: {refused}.")
