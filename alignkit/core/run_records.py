"""What a run leaves in its folder beside the weights, read back for a run folder, a merge, or a checkpoint-N.

- `run_config(folder)`: the settings the model in `folder` was trained with (alignkit_config.json): a run
  folder's or a merge's own, or for a checkpoint-N (which holds none) its run's, one folder up.
- `loaded_as(model_id)`: how the loader loaded a model for training in this process, after every `auto`
  (quantization: 4bit for QLoRA on CUDA by default; dtype; attention: the implementation the model runs, sdpa where
  a recipe's flash_attention_2 cannot run): recorded in the run's settings as `loaded_as`, since the settings keep
  `auto` and the asked attention as given. A model card cites QLoRA by it, a reward model is scored as it trained by it.
  `loaded_chain(model_id)`: the chain it loaded (base, revision, deltas, adapters), recorded as `loaded_chain`, and
  read back by `recorded_chain(folder)`: a model card names the base by it.
- `checkpoint_metrics(folder)`: a checkpoint-N's own figures, from the Trainer's trainer_state.json in it: the
  last logged value of each training and evaluation metric up to its step. A run's metrics.json holds the
  finished run's, which are not the checkpoint's; a merge or a model card of the checkpoint shows these instead.
- `hub_datasets(dataset_id, dataset_mixture)`: the Hub datasets a run trains on, decided where it runs:
  recorded in its settings as `hub_datasets`, since a relative local path read from another folder looks like a
  Hub id (a model card of a merge made elsewhere).
- `check_not_nested(folder, run_name)`: a new run inside another trained run's folder (a --run_name beside a
  recipe's output_dir that holds one) refused, before the model loads (alignkit.train.run_folder.prepare_run).
- `checkpoints(folder)`: a run folder's complete checkpoint-N folders, by step (a resume, and a claimed folder's
  description, alignkit.modeling.models, read them alike).
- `merge_folder(adapter_dir)`: where merge.py saves a merge by default: `merged/` inside a run folder, and beside a
  checkpoint-N (`merged-checkpoint-N/` in its run folder), since a resumed run deletes its old checkpoints whole.
  `merge_name(folder)`: the name a card gives such a merge, its run's (`tiny-dpo-merged`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from alignkit.core.errors import UserError
from alignkit.core.sources import is_hub_id

# A run's settings file in its folder (alignkit.train.run_folder.CONFIG_FILE).
RUN_CONFIG = "alignkit_config.json"
# A run folder claimed by a training that has saved no checkpoint yet (alignkit.train.run_folder): where the earlier run
# in it went meanwhile.
CLAIM_FILE = "alignkit_claim.json"
HUB_DATASETS = "hub_datasets"  # its record there of the Hub datasets it trained on (hub_datasets)
LOADED_AS = "loaded_as"  # its record there of how the model trained over was loaded (quantization, dtype, attention)
# Its record there of the chain the model trained over was loaded from: {"base", "revision", "adapters"}, each local
# part by its absolute path. A card reads it (alignkit.core.card.base_source) without walking the chain again: at
# every checkpoint, that asked the Hub about a Hub adapter, and a run still training named it, or a LoTA delta, as
# the base.
LOADED_CHAIN = "loaded_chain"
# Its record there of the keys its recipe or flags named that alignkit does not apply ({key: {"value", "why"}}, the
# "not applied, and why" log line: alignkit.core.saved_settings.not_applied), for its card.
NOT_APPLIED_RECORD = "not_applied"
# Its record there of what sft.py's loss covered: "assistant turns", "completions" or "every token" (--train_on auto
# as it resolved for these rows and this chat template: alignkit.train.loss_mask.loss_on), for its card.
LOSS_ON = "loss_on"
_CHECKPOINT = re.compile(r"checkpoint-\d+")
# {model_id: {"quantization": ..., "dtype": ..., "attention": ...}} as the loader last loaded it for training in this
# process.
_LOADED_AS: dict[str, dict] = {}
_LOADED_CHAIN: dict[str, dict] = {}  # {model_id: LOADED_CHAIN's record} likewise


def remember_loaded_as(model_id: str, quantization: str, dtype, base: str | None = None,
                       revision: str | None = None, adapters: list[str] = (), deltas: list[str] = ()) -> None:
    """The loader's decisions for a model loaded for training (alignkit.modeling.models.load_model), and the chain
    it loaded: `base` at `revision`, the LoTA `deltas` added into it, the LoRA `adapters` on it, from the base up."""
    _LOADED_AS[str(model_id)] = {"quantization": quantization, "dtype": str(dtype).removeprefix("torch.")}
    if base:
        def where(part: str) -> str:
            return os.path.abspath(part) if Path(part).exists() else part

        _LOADED_CHAIN[str(model_id)] = {"base": where(base), "revision": revision,
                                        "deltas": [where(d) for d in deltas], "adapters": [where(a) for a in adapters]}


def remember_attention(model_id: str, attention: str | None) -> None:
    """The attention implementation a model loaded for training runs (its config's, once loaded), beside
    remember_loaded_as's record: the asked one stays in the settings as given (flash_attention_2 on a CPU runs sdpa)."""
    if attention and str(model_id) in _LOADED_AS:
        _LOADED_AS[str(model_id)]["attention"] = str(attention)


def recorded_chain(folder) -> dict | None:
    """The chain a run folder's (or a checkpoint-N's) run loaded (LOADED_CHAIN), where the model saved here still
    stands on it: its adapter_config.json names the top of that chain as its base (a run's adapter; a LoTA delta's
    checkpoint, re-pointed at it: alignkit.train.trainers.CheckpointBase), or, in a checkpoint-N, the bare base PEFT
    writes there. An adapter re-pointed by hand at another base (its Hub id before a push, a moved base) is read from
    its file instead. None where there is no such record."""
    from alignkit.modeling.chain import _recorded_base

    folder = Path(folder)
    loaded = run_config(folder).get(LOADED_CHAIN)
    if not isinstance(loaded, dict) or not loaded.get("base"):
        return None
    if not (folder / "adapter_config.json").is_file():
        return loaded
    try:
        named = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        return None
    here = _recorded_base(str(folder), named)
    stands_on = [([*loaded.get("deltas", []), *loaded.get("adapters", [])] or [loaded["base"]])[-1]]
    if is_checkpoint(folder.resolve()):
        stands_on.append(loaded["base"])
    same = any(here == part or Path(here).exists() and Path(part).exists() and Path(here).samefile(part)
               for part in stands_on)
    return loaded if same else None


def loaded_chain(model_id: str) -> dict:
    """LOADED_CHAIN's record of `model_id` as last loaded for training in this process; {} when it was not."""
    return dict(_LOADED_CHAIN.get(str(model_id), {}))


def loaded_as(model_id: str) -> dict:
    """{"quantization": "4bit" | "8bit" | "none", "dtype": "bfloat16" | ..., "attention": "sdpa" | ...} of
    `model_id` as last loaded for training in this process; {} when it was not."""
    return dict(_LOADED_AS.get(str(model_id), {}))


def hub_dataset(dataset: str) -> str | None:
    """`dataset` (a --dataset_id or a mixture's id) when it names a Hub dataset from this folder, else None."""
    return dataset if dataset.count("/") == 1 and is_hub_id(dataset) and not Path(dataset).exists() else None


def hub_datasets(dataset_id: str | None, dataset_mixture: dict | None) -> list[str]:
    """The Hub datasets a run trains on, in order: each of `--dataset_mixture`'s where one is given (its
    `--dataset_id` is then the script's default, unread), else `--dataset_id`."""
    mixture = (dataset_mixture or {}).get("datasets", [])
    ids = [entry.get("id") or "" for entry in mixture] if mixture else [dataset_id or ""]
    return list(dict.fromkeys(d for d in map(hub_dataset, ids) if d))


def recorded_hub_datasets(config: dict) -> list[str]:
    """The Hub datasets a run's saved settings trained on: as recorded where it ran, else (a run saved before the
    record) its --dataset_id when that names a Hub dataset from this folder."""
    if HUB_DATASETS in config:
        return list(config[HUB_DATASETS] or [])
    return hub_datasets(config.get("dataset_id"), config.get("dataset_mixture"))


def trained_quantization(folder) -> str | None:
    """The quantization the model in `folder` (a run, its checkpoint or its merge) was trained over: the loader's
    record, else the setting when it was not `auto`; None when neither tells."""
    config = run_config(folder)
    recorded = (config.get(LOADED_AS) or {}).get("quantization")
    return recorded or (config.get("quantization") if config.get("quantization") != "auto" else None)


FOUR_BIT_FIELDS = {"bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True}  # each with its value before it existed


def trained_four_bit(folder, record: dict | None = None) -> dict:
    """The 4-bit format the model in `folder` trained over, as loader settings ({"bnb_4bit_quant_type": "nf4",
    "use_bnb_nested_quant": True}): its run's settings, else `record` (a Hub copy's metrics.json); a run saved
    before the settings existed trained over NF4 with double quantization."""
    source = run_config(folder) or record or {}
    return {k: source.get(k, default) for k, default in FOUR_BIT_FIELDS.items()}


def earlier_run_aside(folder) -> Path | None:
    """Where the earlier run of `folder` is while a training claims it before its first checkpoint (it is running,
    or it was killed, and a rerun of it puts the earlier run back); None when no claim says so."""
    try:
        earlier = Path(json.loads((Path(folder) / CLAIM_FILE).read_text())["earlier_run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return earlier if earlier.is_dir() else None


def incomplete_checkpoint(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None. transformers writes trainer_state.json last: a checkpoint
    cut off by a crash has none, or a torn one. Its weights must open too (a file cut short by a full disk or a copy
    stopped halfway): such a checkpoint is skipped (prepare_run says so in one line), and the run resumes from the
    one before."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except FileNotFoundError:
        return f"{checkpoint} has no trainer_state.json (cut off while it was saved)"
    except OSError as error:
        return f"{checkpoint}/trainer_state.json cannot be read ({error.strerror or type(error).__name__})"
    except ValueError:
        return f"{checkpoint} has a damaged trainer_state.json (cut off while it was saved)"
    from safetensors import safe_open

    for weights in checkpoint.rglob("*.safetensors"):
        try:
            with safe_open(str(weights), "pt") as opened:
                opened.keys()
        except Exception as error:  # noqa: BLE001 - safetensors' own error types: any unreadable header
            return f"{weights} is damaged ({' '.join(str(error).split())[:80]})"
    return None


def checkpoints(folder: Path, say: bool = False) -> list[Path]:
    """The folder's complete checkpoint-N folders, by step; `say`: each one skipped in a log line."""
    found = []
    for path in folder.glob("checkpoint-*"):
        if path.name.split("-")[-1].isdigit():
            if (why := incomplete_checkpoint(path)) is None:
                found.append(path)
            elif say:
                from alignkit import logger

                logger.warning(f"{why}: {path.name} is skipped")
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def check_not_nested(folder, run_name: str | None) -> None:
    """Refuse a new run in `folder` whose parent (the --output_dir it goes in) is a trained run of its own (its
    adapter, a checkpoint-N): `--run_name ov` beside a recipe's output_dir that holds a run put the new one inside
    it, where a push or a merge of that run carries it. Where `folder` already holds a run (nested there before),
    its rerun or resume goes on."""
    folder = Path(folder)
    if (folder / RUN_CONFIG).is_file() or (folder / CLAIM_FILE).is_file():
        return
    parent = folder.parent
    marks = [n for n in ("adapter_model.safetensors", "adapter_config.json", "lota_config.json")
             if (parent / n).exists()]
    marks += sorted(p.name for p in parent.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit())
    if marks:
        raise UserError(f"--output_dir {parent} holds a trained run ({marks[0]}), and this run would go inside it "
                        f"({folder}), where a push or merge of that run carries it: pass another --output_dir (e.g. "
                        f"{parent.parent}, beside it)" + (f", or leave --run_name out to train in {parent} itself (a "
                                                         "recipe's output_dir)" if run_name else ""))


def is_checkpoint(folder) -> bool:
    """Whether `folder` is named as a Trainer's checkpoint-N."""
    return bool(_CHECKPOINT.fullmatch(Path(folder).name))


def merge_folder(adapter_dir) -> Path:
    """merge.py's default --output_dir for `adapter_dir`: its `merged/`, or for a checkpoint-N the run folder's
    `merged-checkpoint-N/` (inside the checkpoint, the run's checkpoint rotation deleted it with the checkpoint)."""
    adapter = Path(adapter_dir)
    if is_checkpoint(adapter):
        return adapter.parent / f"merged-{adapter.name}"
    return adapter / "merged"


def repo_name(adapter_dir) -> str:
    """The Hub repo a push without --hub_repo_id makes for `adapter_dir`: its run's name, and for a checkpoint-N its
    run's name and step (`checkpoint-20` of two runs went to one repo, the second push replacing the first's files:
    the review of session 32)."""
    here = Path(adapter_dir).resolve()
    return f"{here.parent.name}-{here.name}" if is_checkpoint(here) else here.name


def merge_name(folder, at=None) -> str:
    """The name of the model in `folder`: a merge saved where merge_folder puts it for the top of its chain (its
    merge.json) takes its run's name (`tiny-dpo-merged`, `tiny-dpo-merged-checkpoint-20`), not the bare `merged`
    every run's merge is called; any other folder its own name. `at`: where `folder` is about to be moved (a merge
    written beside its place, alignkit.modeling.merge), which names it."""
    here = Path(at or folder).resolve()
    try:
        merge = json.loads((Path(folder) / "merge.json").read_text())
    except (OSError, ValueError):
        merge = {}
    top = [*(merge.get("lota_deltas") or []), *(merge.get("adapters") or [])][-1:] if isinstance(merge, dict) else []
    if top and isinstance(top[0], str) and merge_folder(Path(top[0]).resolve()) == here:
        return f"{here.parent.name}-{here.name}"
    return here.name


def run_config(folder) -> dict:
    """The settings a model folder was trained with (its alignkit_config.json): a run folder's or a merge's own, or
    for a checkpoint-N, its run's, one folder up (a checkpoint holds none); {} when there are none."""
    here = Path(folder).resolve()
    for candidate in (here, *([here.parent] if is_checkpoint(here) else [])):
        try:
            found = json.loads((candidate / RUN_CONFIG).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict):
            return found
    return {}


def checkpoint_metrics(folder) -> dict:
    """A checkpoint's figures at its step, from its trainer_state.json: each metric's last logged value up to the
    step (the training loss, rewards/accuracies, eval_loss, ...), then `global_step` and `checkpoint` (its folder's
    name); {} for a folder without a Trainer state (a run folder, a merge)."""
    try:
        state = json.loads((Path(folder) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict):
        return {}
    step = state.get("global_step")
    metrics: dict = {}
    for entry in state.get("log_history") or []:
        if not isinstance(entry, dict) or (step is not None and entry.get("step", 0) > step):
            continue
        metrics.update({k: v for k, v in entry.items() if k != "step" and isinstance(v, (int, float, str))})
    if step is not None:
        metrics["global_step"] = step
    metrics["checkpoint"] = Path(folder).resolve().name
    return metrics
