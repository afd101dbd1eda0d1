"""The chain from an adapter down to its base, each part a Hub id or a local path (alignkit.core.sources).

A neutral module (it imports no loader, card or Hub code), so the loader, the model card, the Hub upload and the
identity of a model as loaded (alignkit.modeling.identity) all read a chain the same way.

Revisions: `--revision` is the revision of `--model_id`. Each part below it loads at the revision the part above
recorded for its base: PEFT's `revision` field in adapter_config.json (alignkit.modeling.models.save_adapter
writes it for a Hub base, as `get_peft_model(..., revision=)` does), or the same field in lota_config.json; none
is the Hub's default branch. So an adapter trained on `--model_id org/base --revision v1` loads on org/base at v1.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple

from alignkit.core.errors import UserError

# A LoTA delta folder (alignkit.modeling.lota_delta): the sparse delta and the config naming its base.
LOTA_DELTA_FILE, LOTA_CONFIG_FILE = "lota_delta.safetensors", "lota_config.json"


def adapter_config(source: str, revision: str | None = None) -> dict | None:
    """The adapter_config.json of `source` as a dict, or None when `source` is a full model."""
    path = Path(source)
    if path.is_dir():
        file = path / "adapter_config.json"
        if not file.is_file():
            return None
        try:
            config = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # cut short, or edited by hand
            raise UserError(f"{file} is not valid JSON ({e}): fix it, or copy it again from where the adapter "
                            "was trained") from None
        if not isinstance(config, dict):
            raise UserError(f"{file} is no JSON object: fix it, or copy it again from where the adapter was trained")
        return config
    if path.exists() or source.count("/") != 1:
        return None
    # A Hub id: ask the Hub whether it holds an adapter; offline, let from_pretrained report the problem. A Hub that
    # does not answer is one line now, not a minute of the download's retries first.
    from alignkit.core.sources import require_reachable

    require_reachable(source)
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "adapter_config.json", revision=revision)).read_text())
    except Exception:  # noqa: BLE001 - not an adapter, or not reachable: treat as a full model
        return None


def _recorded_base(adapter: str, base: str) -> str:
    """Where the base an adapter records lives: a relative path counts from the adapter's folder.

    save_adapter records a local adapter it was trained on relative to itself, so a chain copied or moved as a
    whole still resolves; absolute paths (older runs, local full models) and Hub ids stay as they are.
    """
    if Path(adapter).is_dir() and not Path(base).is_absolute():
        beside = Path(adapter, base)
        if beside.exists() or base.startswith("."):
            return os.path.normpath(os.path.abspath(beside))
    return base


def _adapters(source: str, revision: str | None,
              base_model: str | None = None) -> tuple[str, str | None, list[tuple[str, str | None]]]:
    """(base, the base's revision, [(adapter, its revision)] from `source` down), through LoRA adapters only.
    base_model (merge.py --base_model): where a recorded local base that is gone now is (moved or renamed)."""
    steps: list[tuple[str, str | None]] = []
    while (config := adapter_config(source, revision)) is not None:
        steps.append((source, revision))
        recorded = config.get("base_model_name_or_path")
        if not recorded:
            raise UserError(f"{source}/adapter_config.json has no base_model_name_or_path; pass the base with --model_id")
        base = _recorded_base(source, recorded)
        if not (Path(base, "adapter_config.json").is_file() or is_delta_folder(base)):
            steps += [(str(part), None) for part in reversed(checkpoint_frozen(source))]
        if len(steps) > 8:
            raise UserError(f"adapter chain from {source} is longer than 8: does an adapter name itself as its base?")
        if _looks_local(base) and not Path(base).exists():
            if base_model:  # moved: --base_model says where (alignkit.modeling.lineage checks it by content)
                return base_model, None, steps
            raise UserError(
                f"{source}/adapter_config.json names its base {recorded!r}, which is not there "
                f"({'relative paths count from the adapter folder; ' if base != recorded else ''}was it moved or "
                "deleted?). Put it back, or point base_model_name_or_path at where it is now (merge.py: --base_model)."
            )
        source, revision = base, config.get("revision")  # PEFT's field: the revision of the base it names
    return source, revision, steps


def checkpoint_frozen(source: str) -> list[Path]:
    """The adapters a training checkpoint (`checkpoint-N`) keeps below its own, from the base upwards.

    A run on top of adapters trains one more over them, frozen (alignkit.modeling.models names them frozen_0,
    frozen_1, ... from the base up); the Trainer saves each in a subfolder of the checkpoint, and the checkpoint's
    own adapter_config.json names the bare base model. So a checkpoint is that chain: loaded without them it
    would be another model. A run's final folder saves only its own adapter and names the one below instead.
    A run over a LoTA delta cannot keep its delta that way: its checkpoints name the run's `--model_id` instead
    (alignkit.modeling.models.add_trainable_adapter), whose chain holds the frozen adapters, so these are skipped.
    """
    folder = Path(source)
    if not folder.is_dir():
        return []
    found = {int(p.name.split("_")[1]): p for p in folder.glob("frozen_*")
             if p.name.split("_")[1].isdigit() and (p / "adapter_config.json").is_file()}
    return [found[i] for i in sorted(found)]


def adapter_chain(source: str, revision: str | None = None) -> tuple[str, list[str]]:
    """(base model id, [adapter sources from the base upwards]); a LoTA delta folder counts as a base here
    (`resolve` goes through it)."""
    base, _, steps = _adapters(source, revision)
    return base, [part for part, _ in reversed(steps)]


def is_delta_folder(source: str) -> bool:
    return Path(source, LOTA_CONFIG_FILE).is_file() and Path(source, LOTA_DELTA_FILE).is_file()


class Chain(NamedTuple):
    """A model as the loader builds it: `base` loaded at `revision`, the LoTA `deltas` added into its weights, the
    LoRA `adapters` on top (both lists from the base upwards); `revisions`: the revision each part loads at."""

    base: str
    revision: str | None
    adapters: list[str]
    deltas: list[str]
    revisions: dict[str, str | None]


def tokenizer_source(chain: Chain, base: str, base_revision: str | None) -> tuple[str, str | None]:
    """(where the tokenizer and its chat template load from, at which revision): the topmost adapter that saved one
    (alignkit saves it beside every adapter, and a push uploads it: a Hub adapter counts too), else the base."""
    for part in reversed(chain.adapters):
        local = Path(part).is_dir()
        if local and Path(part, "tokenizer_config.json").is_file():
            return part, None
        if not local:
            found = _hub_file(part, "tokenizer_config.json", chain.revisions[part])
            if found:
                return part, chain.revisions[part]
            if found is None:
                _say_unknown(part, chain.revisions[part])
    return base, base_revision


def _hub_file(repo: str, name: str, revision: str | None) -> bool | None:
    """Whether Hub repo `repo` holds `name` at `revision` (fetched once, then from the cache); None when offline
    and the cache has no record of it either way."""
    from huggingface_hub import try_to_load_from_cache

    from alignkit.core.sources import hub_offline

    cached = try_to_load_from_cache(repo, name, revision=revision)
    if isinstance(cached, str):
        return True
    if cached is not None:  # the Hub's 404, as the cache recorded it
        return False
    if hub_offline():
        return None
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo, name, revision=revision)
        return True
    except Exception:  # noqa: BLE001 - not there, or not reachable: the caller falls back
        return False


@functools.cache
def _say_unknown(repo: str, revision: str | None) -> None:
    """Once per adapter: offline, the tokenizer below it is used, and the user should know why."""
    from alignkit import logger

    at = f" at {revision}" if revision else ""
    logger.warning(f"{repo}{at}: offline (HF_HUB_OFFLINE=1), and the Hugging Face cache does not say whether this "
                   "adapter has its own tokenizer: the one below it in the chain is used, chat template included; run "
                   "once without HF_HUB_OFFLINE to fetch it")


def resolve(source: str, revision: str | None = None, base_model: str | None = None) -> Chain:
    """`source`'s whole chain, through LoRA adapters and LoTA delta folders alike, each part at its revision.

    Every part adds to the weights (LoRA as B A x beside W, a delta into W), so the deltas can go on the base in
    any order before the adapters and give the same model. base_model: see _adapters."""
    base, revision, steps = _adapters(source, revision, base_model)
    adapters, deltas = [part for part, _ in steps], []
    revisions = dict(steps)
    while is_delta_folder(base):
        deltas.append(base)
        revisions[base] = None
        if len(deltas) > 8:
            raise UserError(f"LoTA chain from {base} is longer than 8: does a delta name itself as its base?")
        config = json.loads(Path(base, LOTA_CONFIG_FILE).read_text())
        if not config.get("base_model_name_or_path"):
            raise UserError(f"{base}/{LOTA_CONFIG_FILE} has no base_model_name_or_path")
        base, revision, steps = _adapters(config["base_model_name_or_path"], config.get("revision"), base_model)
        adapters += [part for part, _ in steps]
        revisions.update(steps)
    revisions[base] = revision
    return Chain(base, revision, adapters[::-1], deltas[::-1], revisions)


def _looks_local(source: str) -> bool:
    """A filesystem path rather than a Hub id: absolute, ./ ../ ~, or more than one "/"."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
