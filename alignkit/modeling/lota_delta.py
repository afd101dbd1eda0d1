"""A LoTA sparse delta as a model part: the parametrization W + D, the layers it targets, its files, and what every
loader does with a delta folder. How a run finds and trains one (calibration, mask, sparse training): alignkit.train.lota.

- `SparseDelta`: a `torch.nn.utils.parametrize` parametrization of a targeted `weight` that computes W + D in the
  forward pass (one `index_add` over the flattened weight, in float32), from the frozen original W and float32
  values v, D = scatter(M, v) on a mask M (or dense v while calibrating); in bf16/fp16 the sum is rounded to the
  weight's dtype, exactly as `apply_deltas` rounds W + D on load, so the loaded model is the trained one.
  `attach` puts one on each targeted layer, `reference_mode` switches them all off (the starting weights).
- Targets (`target_modules`): every linear layer but the LM head, or those `--lota_target_modules` names, under
  their plain-model names even when a frozen LoRA chain wraps them, so a delta loads onto the base.
- A LoTA folder holds `lota_delta.safetensors` (per matrix `<name>.indices`, flat int32/int64 positions, and
  `<name>.values`, float32), `lota_mask.safetensors` (the indices alone, with every targeted matrix's shape in its
  metadata), `lota_config.json` (base model, sparsity, counts) and the tokenizer.
- Loading (`alignkit.modeling.models.load_model`): `alignkit.modeling.chain.resolve` follows delta folders down to
  their base, `full_precision` and `check_launch` refuse what cannot hold a delta (4/8-bit weights, FSDP, ZeRO-3) before
  anything loads, and `apply_deltas` adds W += D in place (in full precision), on top of which any chain of LoRA
  adapters goes, so evaluate.py and merge.py take a LoTA folder like an adapter.
- `add_deltas` merges two sparse deltas of the same base by addition (a task merge, merge.py --add_delta),
  reporting how many entries both touch.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.modeling.chain import LOTA_CONFIG_FILE, LOTA_DELTA_FILE

DELTA_FILE, CONFIG_FILE = LOTA_DELTA_FILE, LOTA_CONFIG_FILE  # alignkit.modeling.chain walks delta folders too
MASK_FILE = "lota_mask.safetensors"
# Names of the delta's tensors inside the model's state dict; refcache skips them (the reference never uses them).
STATE_NAMES = ("lota_values", "lota_indices")


# ---------------------------------------------------------------------------------------------------------
# The delta on each targeted matrix


class SparseDelta(torch.nn.Module):
    """Parametrization weight -> weight + D. `indices` None: dense D (calibration); else D = scatter(indices, values)."""

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(weight.shape)
        size = weight.numel() if indices is None else indices.numel()
        self.lota_values = torch.nn.Parameter(torch.zeros(size, dtype=torch.float32, device=weight.device))
        self.register_buffer("lota_indices", None if indices is None else indices.to(weight.device, torch.int64))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        flat = weight.reshape(-1).float()
        if self.lota_indices is None:
            out = flat + self.lota_values
        else:
            out = flat.index_add(0, self.lota_indices, self.lota_values)
        return out.view(self.shape).to(weight.dtype)

    def dense(self) -> torch.Tensor:
        """D as a dense float32 tensor of the weight's shape."""
        values = self.lota_values.detach()
        if self.lota_indices is None:
            return values.view(self.shape).clone()
        flat = torch.zeros(math.prod(self.shape), dtype=torch.float32, device=values.device)
        return flat.index_add_(0, self.lota_indices, values).view(self.shape)


def layers(model):
    """(name, module) of every module as the plain model names it. Under a PeftModel (a LoRA chain kept frozen
    under a LoTA run) a LoRA-wrapped layer stands for its base layer under its own name, and the adapters' own
    layers are left out, so the delta's names are the plain model's and it loads onto the base."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = model.get_base_model() if isinstance(model, PeftModel) else model
    tuners: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(t + ".") for t in tuners):
            continue  # inside a LoRA layer: its adapters (or its base layer, yielded below)
        if isinstance(module, BaseTunerLayer):
            tuners.append(name)
            module = module.get_base_layer()
        yield name, module


def target_modules(model, patterns=("all-linear",)) -> dict[str, torch.nn.Module]:
    """{module name: module} of the targeted linear layers: all but the LM head, or those whose name ends in a pattern."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head.get_base_layer() if isinstance(head, BaseTunerLayer) else head
    found = {}
    for name, module in layers(model):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if list(patterns) == ["all-linear"] or any(name == p or name.endswith(f".{p}") for p in patterns):
            found[name] = module
    if not found:
        raise ConfigError(f"--lota_target_modules {list(patterns)} matches no linear layer of this model")
    return found


def model_deltas(model) -> dict[str, SparseDelta]:
    """{layer name: its SparseDelta} of every layer that carries one."""
    return {
        name: module.parametrizations["weight"][0]
        for name, module in layers(model)
        if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations["weight"][0], SparseDelta)
    }


def has_delta(model) -> bool:
    return bool(model_deltas(model))


def attach(model, modules: dict[str, torch.nn.Module], mask: dict[str, torch.Tensor] | None) -> None:
    """Freeze everything, then put a trainable delta on each module: dense (mask None) or on the masked entries."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in modules.items():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)  # back to the start
        delta = SparseDelta(module.weight, None if mask is None else mask[name])
        parametrize.register_parametrization(module, "weight", delta, unsafe=True)
        module.parametrizations["weight"].original.requires_grad_(False)


def remove(model, merge: bool) -> None:
    """Drop every delta: folded into the weights (merge) or discarded (back to the starting weights)."""
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=merge)


@contextlib.contextmanager
def reference_mode(model):
    """The DPO reference: every delta off, i.e. the starting weights, for the duration of the block."""
    deltas = list(model_deltas(model).values())
    for d in deltas:
        d.enabled = False
    try:
        yield
    finally:
        for d in deltas:
            d.enabled = True


def weight_shapes(modules: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """{name: weight shape} of targeted modules: what a mask file records and is checked against."""
    return {n: tuple(m.weight.shape) for n, m in modules.items()}


def log_trainable(model, phase: str) -> None:
    """One line: how many values the phase that starts now trains (the delta's), of all the model's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"LoTA {phase}: {trainable:,} trainable values of {total:,} parameters ({100 * trainable / total:.3f}%)")


# ---------------------------------------------------------------------------------------------------------
# Mask files


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def save_mask(mask: dict[str, torch.Tensor], shapes: dict[str, tuple], path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {n: idx.to(_index_dtype(math.prod(shapes[n]))).contiguous().cpu() for n, idx in mask.items()}
    meta = {"shapes": json.dumps({n: list(s) for n, s in shapes.items()}), **{k: str(v) for k, v in (extra or {}).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    # A crash never leaves a torn mask for a later run to reuse. Not journal.write_atomic: that takes the file
    # as bytes in memory, and a 7B model's mask indices are gigabytes.
    tmp.replace(path)


def load_mask(path: str | Path, shapes: dict[str, tuple], what: str = "--lota_mask") -> dict[str, torch.Tensor]:
    """Read a mask file and check that it was made for a model with exactly these targeted matrices."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file (pass a {MASK_FILE} or a LoTA run folder)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        saved = {n: tuple(s) for n, s in json.loads(meta.get("shapes", "{}")).items()}
        tensors = {n: f.get_tensor(n).long() for n in f.keys()}
    missing, extra = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    if missing or extra:
        raise ConfigError(
            f"{what} {path} was made for another model or other --lota_target_modules: "
            f"{len(missing)} targeted matrices missing from it (e.g. {missing[:2]}), {len(extra)} unknown here "
            f"(e.g. {extra[:2]}). Use a mask from a run on this base model with the same targets."
        )
    for n, shape in shapes.items():
        if tuple(saved[n]) != tuple(shape):
            raise ConfigError(
                f"{what} {path} was made for another model: {n} has shape {list(saved[n])} there, {list(shape)} here"
            )
        idx = tensors.get(n, torch.zeros(0, dtype=torch.long))
        if idx.numel() and (idx.min() < 0 or idx.max() >= math.prod(shape)):
            raise ConfigError(f"{what} {path} is damaged: indices of {n} fall outside its {list(shape)} entries")
        tensors[n] = idx
    return tensors


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    """Entries two masks share."""
    return sum(int(torch.isin(a[n], b[n]).sum()) for n in a.keys() & b.keys())


# ---------------------------------------------------------------------------------------------------------
# Delta folders: saving, reading, loading, merging


def save_delta(model, out: Path, base_source: str | None = None, extra: dict | None = None,
               revision: str | None = None) -> None:
    """Write the sparse delta, its mask and (with base_source) lota_config.json to `out`; `revision`: the Hub
    revision base_source was loaded at (recorded for a Hub base, as save_adapter does)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors, mask, shapes = {}, {}, {}
    for name, d in model_deltas(model).items():
        if d.lota_indices is None:
            raise RuntimeError("LoTA: the model still carries a dense calibration delta; nothing sparse to save")
        shapes[name] = d.shape
        mask[name] = d.lota_indices
        tensors[f"{name}.indices"] = d.lota_indices.to(_index_dtype(math.prod(d.shape))).cpu().contiguous()
        tensors[f"{name}.values"] = d.lota_values.detach().float().cpu().contiguous()
    meta = {"shapes": json.dumps({n: list(s) for n, s in shapes.items()})}
    save_file(tensors, str(out / DELTA_FILE), metadata=meta)
    save_mask(mask, shapes, out / MASK_FILE)
    if base_source is not None:
        kept, total = sum(m.numel() for m in mask.values()), sum(math.prod(s) for s in shapes.values())
        config = {
            "lota": True,
            "base_model_name_or_path": str(Path(base_source).resolve()) if Path(base_source).exists() else base_source,
            "revision": None if Path(base_source).exists() else revision,
            "entries": kept, "targeted_entries": total, "kept_share": kept / total, **(extra or {}),
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_delta(folder: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple]]:
    """({name: (flat indices, float32 values)}, {name: shape}) of a LoTA folder (or its delta file)."""
    from safetensors import safe_open

    path = Path(folder)
    path = path / DELTA_FILE if path.is_dir() else path
    with safe_open(str(path), "pt") as f:
        shapes = {n: tuple(s) for n, s in json.loads((f.metadata() or {})["shapes"]).items()}
        delta = {n: (f.get_tensor(f"{n}.indices").long(), f.get_tensor(f"{n}.values").float()) for n in shapes}
    return delta, shapes


def check_launch(s, sharded: str | None, deltas: list[str] = ()) -> None:
    """Refuse `--adapter lota` under a sharded launch (`sharded`: alignkit.modeling.models._sharded_launch), before
    the model loads. FSDP flattens each layer's parameters into one tensor of one dtype, which the float32 delta
    values beside bf16 weights break ("Must flatten tensors with uniform dtype"); ZeRO-3 partitions every weight,
    so each SparseDelta would take its shape from an empty [0] partition and train nothing. DDP and ZeRO-2 keep
    whole weights on every process, and LoRA shards under both.

    A model whose chain holds a LoTA delta (a LoRA run over a LoTA run) is refused under ZeRO-3 too: the delta adds
    into whole weights, and ZeRO-3 builds them partitioned ([0] on every rank). FSDP loads them whole first (on the
    main process), so the delta goes in before they are sharded."""
    if sharded and getattr(s, "adapter", "lora") == "lota":
        from alignkit.core.launch import refusal

        raise ConfigError(refusal(s, ""))  # the launch's own line (alignkit.core.launch.refusal)
    from alignkit.core.launch import ZERO3

    if sharded == ZERO3 and deltas:
        raise ConfigError(f"{s.model_id} holds a LoTA delta ({deltas[-1]}), which adds into whole weights, and "
                          "DeepSpeed ZeRO-3 builds them partitioned: launch with DDP (recipes/accelerate/ddp.yaml), "
                          f"ZeRO-2 or FSDP, or merge it first (python merge.py --adapter_dir {s.model_id}) and train "
                          "on the merged folder")


def check_experts(s, model_config) -> None:
    """Refuse `--adapter lota` on a mixture of experts before the weights load, unless --lota_target_modules names
    what to adapt: transformers 5 keeps the experts' weights in 3D tensors, not linear layers, so all-linear would
    silently adapt the attention alone (a twelfth of a Mixtral's weights); LoRA targets the experts too where PEFT
    knows the family (Mixtral's; elsewhere it says in one line that they are left: experts.say_unadapted)."""
    if getattr(s, "adapter", "lora") != "lota" or list(getattr(s, "lota_target_modules", [])) != ["all-linear"]:
        return
    try:
        config = model_config().get_text_config()
    except Exception:  # noqa: BLE001 - unreadable here: from_pretrained reports the problem itself
        return
    if getattr(config, "num_experts_per_tok", None) or getattr(config, "num_local_experts", None):
        raise ConfigError(f"--adapter lota on {s.model_id}, a mixture of experts: LoTA's deltas go on linear layers, "
                          "and its experts' weights are 3D tensors, so only the attention would be adapted. Use LoRA "
                          "(--adapter lora targets the experts too where PEFT knows the family, as Mixtral's, with --lora_dropout 0), or pass --lota_target_modules to adapt the "
                          "named linear layers only")


def full_precision(s, quantization: str, deltas: list[str]) -> str:
    """The quantization to load with: none for a LoTA run or a model with deltas (they add to full weights)."""
    if quantization == "none" or not (deltas or getattr(s, "adapter", "lora") == "lota"):
        return quantization
    if s.quantization in ("4bit", "8bit"):
        what = "--adapter lota" if getattr(s, "adapter", "lora") == "lota" else f"the LoTA delta {deltas[-1]}"
        raise ConfigError(f"{what} needs full-precision weights, not --quantization {s.quantization}: pass --quantization none")
    logger.info("quantization: none (a LoTA delta adds to the weights, which must be in full precision)")
    return "none"


def apply_deltas(model, deltas: list[str]) -> None:
    """W += D for each LoTA folder, in place, after checking the delta fits this model."""
    for folder in deltas:
        delta, shapes = read_delta(folder)
        modules = target_modules(model, [n.rsplit(".", 1)[-1] for n in shapes]) if shapes else {}
        for name, shape in shapes.items():
            module = modules.get(name)
            if module is None or tuple(module.weight.shape) != tuple(shape):
                here = None if module is None else list(module.weight.shape)
                raise ConfigError(f"LoTA delta {folder} does not fit this model: {name} is {list(shape)} there, {here} here")
            indices, values = delta[name]
            with torch.no_grad():
                flat = module.weight.data.view(-1)
                flat.copy_(flat.float().index_add(0, indices.to(flat.device), values.to(flat.device)).to(flat.dtype))
        logger.info(f"LoTA delta applied: {folder}")


def add_deltas(a: str | Path, b: str | Path, out: str | Path) -> dict:
    """Task merge: D = D_a + D_b, a LoTA folder on the same base. Returns counts, overlap included."""
    delta_a, shapes_a = read_delta(a)
    delta_b, shapes_b = read_delta(b)
    config_a = json.loads(Path(a, CONFIG_FILE).read_text())
    config_b = json.loads(Path(b, CONFIG_FILE).read_text())
    base_a, base_b = config_a["base_model_name_or_path"], config_b["base_model_name_or_path"]
    same = lambda x, y: Path(x).resolve() == Path(y).resolve() if Path(x).exists() else x == y  # noqa: E731
    # Two tasks trained from one base, or a delta trained on top of the other (sequential tasks): then the sum
    # sits on the lower one's base.
    base = base_a if same(base_a, base_b) else base_b if same(base_a, b) else base_a if same(base_b, a) else None
    if base is None or shapes_a != shapes_b:
        raise ConfigError(
            f"{a} and {b} are deltas of different models ({base_a} vs {base_b}, or other targets): only deltas of "
            "one base, or a delta and the one it was trained on, add up"
        )
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, mask, shared = {}, {}, 0
    for name, shape in shapes_a.items():
        (ia, va), (ib, vb) = delta_a[name], delta_b[name]
        dense = torch.zeros(math.prod(shape)).index_add_(0, ia, va).index_add_(0, ib, vb)
        indices = torch.unique(torch.cat([ia, ib]))  # sorted
        shared += int(torch.isin(ia, ib).sum())
        mask[name] = indices
        tensors[f"{name}.indices"] = indices.to(_index_dtype(math.prod(shape)))
        tensors[f"{name}.values"] = dense[indices].contiguous()
    save_file(tensors, str(out / DELTA_FILE), metadata={"shapes": json.dumps({n: list(s) for n, s in shapes_a.items()})})
    save_mask(mask, shapes_a, out / MASK_FILE)
    kept = sum(m.numel() for m in mask.values())
    total = sum(math.prod(s) for s in shapes_a.values())
    report = {"entries_a": sum(v[0].numel() for v in delta_a.values()), "entries_b": sum(v[0].numel() for v in delta_b.values()),
              "overlap": shared, "entries": kept}
    (out / CONFIG_FILE).write_text(json.dumps({
        "lota": True, "base_model_name_or_path": base, "merged_from": [str(a), str(b)],
        "targeted_entries": total, "kept_share": kept / total, **report,
    }, indent=2))
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        if Path(a, name).is_file():
            (out / name).write_bytes(Path(a, name).read_bytes())
    logger.info(f"LoTA merge: {report['entries_a']:,} + {report['entries_b']:,} entries, {shared:,} overlap -> {out}")
    return report
