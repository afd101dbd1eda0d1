"""The one identity of a model as loaded: what every cache of a model's outputs keys on.

A cached answer, verdict, score or output is reused only when the model that would make it now is the model
that made it then. `model_identity(settings, backend)` describes that model completely, so each cache keys on
it plus its own inputs (prompt, sampling, template) and never lists loader fields by hand:

- `loader`: every field of the loader settings groups (alignkit.core.config.ModelSettings, and
  GenerationSettings' engine fields when the settings carry them), taken from the settings object itself, so a
  field added to a group counts from the day it is added. Only the fields in `INERT` are left out, each with
  the reason it cannot change an output. A chat template file counts by its text.
- `chain`: every model along the adapter chain, from the one named down to the base. A local folder counts by
  the content (SHA-256) of each file the loader can read in it, a GGUF file by its content, a Hub model by its
  resolved commit. So a base, an SFT adapter or a merged model retrained in place is another model, and Q2_K
  and Q8_0 of one repo are two models. Hashes are remembered by path, inode, size, mtime and ctime (`file_hash`),
  so a second look at a 14 GB folder costs a few stat calls.
- `backend`: the generation engine (vLLM and transformers sample differently), when the caller has one.
- `hardware`: the device class and the optional kernels installed, the inputs of every `auto` choice (dtype,
  attention, quantization, Liger): a cache made on a CPU in fp32 is not reused on a GPU in 4-bit. A CPU is its
  architecture and vector unit (AVX2 and AVX512 kernels round differently).
- `libraries`: the installed versions of the libraries that compute the outputs (`LIBRARIES`; bitsandbytes, gguf,
  flash-attn and Liger where they compute this model's, `OPTIONAL_LIBRARIES`; the engine's own, `ENGINE_LIBRARIES`):
  an upgrade can change an answer (a fixed attention mask or rotary scaling, another sampling default, a new
  kernel), so an answer made under other versions is made again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import fields
from pathlib import Path

from alignkit.core.digests import digest
from alignkit.core.sources import hub_gguf

# Loader settings that cannot change a model's outputs, each with the reason. Every other field counts.
INERT = {
    "num_threads": "CPU threads change speed, not results",
    "gpu_memory_utilization": "vLLM's memory share sizes its KV cache, not what it answers",
    "trust_remote_code": "it only permits code that a model's files (already hashed) ship",
}

# Loader settings added after caches were made, each with its value before it existed: at that value a field is left
# out, so the caches made before it (the same model, loaded the same way) stay valid; set otherwise, it counts.
ADDED = {
    "chat_template_kwargs": {},  # the chat template's extra arguments (enable_thinking, ...): none before
    "bnb_4bit_quant_type": "nf4",  # the 4-bit format: QLoRA's NF4 with double quantization before (FOUR_BIT)
    "use_bnb_nested_quant": True,
}
# The 4-bit format counts only where the model loads in 4-bit (--quantization 4bit: model_identity keys inference,
# where auto loads the model as saved).
FOUR_BIT = ("bnb_4bit_quant_type", "use_bnb_nested_quant")

# Engine settings that count only through the engine that runs (model_identity's `backend`), each with the reason.
ENGINE_ONLY = {
    "backend": "the engine that runs counts instead: auto and the engine it resolves to are one",
    "max_model_len": "it sizes vLLM's context: it counts under vLLM only",
}

# The libraries whose versions count (distribution names; one not installed is left out): the ones that compute a
# model's outputs on every engine (torch's kernels, the model classes, the adapters), each optional one where it
# computes this model's outputs (OPTIONAL_LIBRARIES, `_used`), and the engine's own where it runs. An optional library
# installed or upgraded for another model is not another model here: evaluate.py refused every answers file after a
# `pip install gguf`.
# tokenizers and jinja2 make the prompt every engine sees: the tokens, and the chat template rendered to text.
LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "jinja2")
OPTIONAL_LIBRARIES = {
    "bitsandbytes": "the 4-bit and 8-bit layers: where the model loads quantized (asked for, or saved so)",
    "gguf": "the reader that dequantizes a .gguf file: where the chain holds one",
    "flash-attn": "its kernels run on CUDA only",
    "liger-kernel": "its kernels run on CUDA only",
}
ENGINE_LIBRARIES = {"vllm": ("vllm",)}

# Files in a model folder that no loader reads: a change to them is not a new model.
_NOT_READ = re.compile(r"(\.png|\.log|\.lock)$|^(README\.md|FAILED|alignkit_evals\.json|\.)", re.IGNORECASE)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# ---------------------------------------------------------------------------------------------------------
# File content, remembered by path, inode, size, mtime and ctime


def _memo_file() -> Path:
    from alignkit.core.paths import cache_dir

    return cache_dir() / "file_hashes.json"


def file_hashes(paths: list[Path]) -> dict[Path, str]:
    """"SIZE-SHA256" of each file's bytes, streamed in 8 MiB blocks; a file seen before with the same path, inode,
    size, mtime and ctime is not read again. One read and at most one write of the memo, however many files: the
    write merges into the memo as it is then, under a lock, so processes hashing at once (the ranks of a launch)
    keep each other's entries."""
    from filelock import FileLock

    from alignkit.core.journal import write_atomic

    memo_file = _memo_file()
    memo = _read_memo(memo_file)
    out, fresh = {}, {}
    for path in paths:
        stat = path.stat()
        # ctime too: any write sets it and nothing sets it back (rsync -a, cp -p and touch -r restore an mtime).
        key = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
        if key not in memo:
            memo[key] = fresh[key] = f"{stat.st_size}-{_sha256(path)}"
        out[path] = memo[key]
    if fresh:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(memo_file) + ".lock", mode=memo_file.parent.stat().st_mode & 0o666):
            write_atomic(memo_file, json.dumps({**_read_memo(memo_file), **fresh}, indent=1))
    return out


def _read_memo(memo_file: Path) -> dict:
    try:
        return json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    return file_hashes([Path(path)])[Path(path)]


# Subfolders a loader reads as part of the model: transformers' tokenizer takes every additional_chat_templates/*.jinja
# as a named template (tool_use, rag, ...), rendered for prompts that ask for it (transformers.utils.hub).
READ_SUBFOLDERS = ("additional_chat_templates",)


def folder_files(folder: Path) -> dict[str, str]:
    """{file name: content hash} of the files a loader can read in `folder`: its top-level files, less images,
    logs, the model card and the evaluation results recorded for it (alignkit.core.card.EVALS_FILE), and the files
    of the subfolders it reads (READ_SUBFOLDERS, as `additional_chat_templates/tool_use.jinja`). Other subfolders
    (checkpoint-N, merged/) are models or states of their own."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not _NOT_READ.search(p.name))
    files += sorted(p for sub in READ_SUBFOLDERS if (folder / sub).is_dir() for p in (folder / sub).rglob("*")
                    if p.is_file())
    return {p.relative_to(folder).as_posix(): h for p, h in file_hashes(files).items()}


# ---------------------------------------------------------------------------------------------------------
# The chain


def hub_commit(repo: str, revision: str | None, filename: str | None = None) -> str | None:
    """The commit `revision` of Hub repo `repo` resolves to, as the loader will load it: the revision itself when
    it is a commit; online, the Hub's answer (from_pretrained downloads a newer upstream commit, not the snapshot
    the local cache holds); offline, or when the Hub does not answer, the Hugging Face cache's snapshot, which is
    what loads then; None when none is known."""
    if revision and _COMMIT.match(revision):
        return revision
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo, revision=revision, timeout=10).sha
        except Exception:  # noqa: BLE001 - no such repo, no network: the cache's snapshot, else the loader reports it
            pass
    for name in ([filename] if filename else ["config.json", "adapter_config.json"]):
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            return Path(found).parent.name if _COMMIT.match(Path(found).parent.name) else None
    return None


def _one(source: str, revision: str | None, gguf_file: str | None) -> dict:
    """One model of the chain by content: a GGUF file, a local folder, or a Hub repo at its commit."""
    path = Path(source)
    is_gguf = source.lower().endswith(".gguf")
    if gguf_file and path.is_dir():
        return {"gguf": file_hash(path / gguf_file)} if (path / gguf_file).is_file() else {"missing": str(path / gguf_file)}
    if path.is_file():
        return {"gguf" if is_gguf else "file": file_hash(path)}
    if path.is_dir():
        return {"files": folder_files(path)}
    if not gguf_file and (found := hub_gguf(source)):  # owner/repo/NAME.gguf
        source, gguf_file = found
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return {"missing": source}  # a local path that is not there: the loader says so when it is needed
    return {"hub": source, "file": gguf_file, "revision": revision, "commit": hub_commit(source, revision, gguf_file)}


def chain_identity(source: str, revision: str | None = None, gguf_file: str | None = None, chain=None) -> list[dict]:
    """Every model along `source`'s chain by content, from `source` down to its base: the chain the loader walks
    (alignkit.modeling.models.load_model), LoRA adapters and LoTA deltas alike, so the base under a delta counts.
    chain: `source`'s chain already resolved (alignkit.modeling.chain.resolve), else resolved here."""
    from alignkit.modeling.chain import resolve

    chain = resolve(source, revision) if chain is None else chain  # each part at the revision it loads at
    *parts, base = chain_parts(chain)
    out = [_one(part, chain.revisions[part], None) for part in parts]
    return out + [_one(base, chain.revision, gguf_file if base == source else None)]


def chain_parts(chain) -> list[str]:
    """A resolved chain's models from the top down: its adapters, its LoTA deltas, its base (chain_identity's order)."""
    return [*reversed(chain.adapters), *reversed(chain.deltas), chain.base]


def data_identity(source: str) -> dict | None:
    """A local data file or folder by content (every file under a folder, by its relative path); None for a Hub
    dataset (its id, config and split are settings already) or a path that is not there."""
    path = Path(source)
    if path.is_file():
        return {"file": file_hash(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {"files": {str(p.relative_to(path)): h for p, h in file_hashes(files).items()}}
    return None


# ---------------------------------------------------------------------------------------------------------
# The identity


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _liger_runs() -> bool:
    """Whether `--use_liger auto` loads Liger's kernels here, as `true` does."""
    from alignkit.core.kernels import liger_runs

    return liger_runs()


def hardware() -> str:
    """The device class and, on CUDA, the optional kernels installed: the inputs of alignkit's "auto" choices
    (without CUDA neither kernel runs and no choice reads them: installing one there is not another machine). A CPU
    is its architecture and the vector unit torch's kernels dispatch to (AVX2, AVX512...): they round differently,
    enough to tip a greedy token or a reward near a tie (it was "cpu" for every CPU)."""
    import importlib.util
    import platform

    import torch

    if not torch.cuda.is_available():
        return f"cpu:{platform.machine() or '?'}:{torch.backends.cpu.get_cpu_capability()}"
    try:
        device = f"cuda:{torch.cuda.get_device_name(0)}"
    except (RuntimeError, AssertionError):  # a CUDA that reports itself but cannot name the device
        device = "cuda"
    kernels = [k for k in ("flash_attn", "liger_kernel") if importlib.util.find_spec(k) is not None]
    return "+".join([device, *kernels])


@functools.cache
def _installed() -> dict[str, str]:
    """{distribution: version} of LIBRARIES and every ENGINE_LIBRARIES entry that is installed (read once)."""
    from importlib import metadata

    out = {}
    for name in (*LIBRARIES, *OPTIONAL_LIBRARIES, *(n for names in ENGINE_LIBRARIES.values() for n in names)):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def libraries(backend: str | None, used: tuple[str, ...] = ()) -> dict[str, str]:
    """The versions that count for a model run by `backend` that computes with the optional libraries `used` (see
    LIBRARIES, `_used`)."""
    names = (*LIBRARIES, *used, *ENGINE_LIBRARIES.get(backend or "", ()))
    return {name: version for name, version in _installed().items() if name in names}


def _used(s, quantization: str | None, chain: list[dict], resolved) -> tuple[str, ...]:
    """The OPTIONAL_LIBRARIES that compute the outputs of the model `s` loads, `quantization` as model_identity keys
    it, `chain` its chain_identity and `resolved` its resolved chain."""
    used = []
    if quantization in ("4bit", "8bit") or _saved_quantized(s, resolved) or _trained_quantized(s, resolved):
        used.append("bitsandbytes")
    if any("gguf" in part or str(part.get("file") or "").lower().endswith(".gguf") for part in chain):
        used.append("gguf")
    if _cuda():
        used += ["flash-attn", "liger-kernel"]
    return tuple(used)


def _resolved(s, chain):
    """`s`'s chain as the loader resolves it (`chain` where already resolved); None where the loader cannot walk it
    (it says so when it loads)."""
    from alignkit.modeling.chain import resolve

    if chain is not None:
        return chain
    try:
        return resolve(s.model_id, s.revision)
    except Exception:  # noqa: BLE001 - a chain the loader cannot walk: it says so when it loads
        return None


def _trained_quantized(s, chain=None) -> bool:
    """Whether an adapter of `s`'s chain trained over a base bitsandbytes quantized (its run's record): a reward model
    judges over its base rounded so (alignkit.feedback.rewards.over_4bit_base), merge --dequantize merges into it."""
    from alignkit.core.run_records import trained_quantization

    chain = _resolved(s, chain)
    if chain is None:
        return False
    return any(Path(part).is_dir() and trained_quantization(part) in ("4bit", "8bit") for part in chain.adapters)


def _saved_quantized(s, chain=None) -> bool:
    """Whether the base of `s`'s chain is saved quantized by bitsandbytes (its config.json's quantization_config),
    so that loading it as saved runs bitsandbytes' layers. A Hub base's config is read from the Hugging Face cache,
    else fetched (the load fetches it anyway: a key made before the first download is the key made after it); not
    at hand at all (offline, uncached: the load fails too), it is taken as not quantized, as almost every model is."""
    chain = _resolved(s, chain)
    if chain is None:
        return False
    if getattr(s, "gguf_file", None) or chain.base.lower().endswith(".gguf"):
        return False
    config = Path(chain.base) / "config.json"
    if not Path(chain.base).exists():
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

        try:
            found = try_to_load_from_cache(chain.base, "config.json", revision=chain.revision)
            if not isinstance(found, str) and not constants.HF_HUB_OFFLINE:
                found = hf_hub_download(chain.base, "config.json", revision=chain.revision)
        except Exception:  # noqa: BLE001 - no such repo, no network, a local path that is not there: the load says
            return False
        if not isinstance(found, str):
            return False
        config = Path(found)
    try:
        quantization = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return not isinstance(quantization, dict) or quantization.get("quant_method") == "bitsandbytes" or \
        any(quantization.get(k) for k in ("load_in_4bit", "load_in_8bit"))


def loader_fields(s) -> dict:
    """The loader settings of `s` that can change its outputs: every field of the loader groups it carries
    (ModelSettings, GenerationSettings) but the INERT ones; the chat template by its text."""
    from alignkit.core.config import GenerationSettings, ModelSettings

    groups = [ModelSettings] + ([GenerationSettings] if isinstance(s, GenerationSettings) else [])
    # model_id counts through the chain instead (model_identity): a local folder by its content, however the path is
    # spelled (relative, absolute, ./) and wherever the folder moved; a Hub id by repo and commit.
    names = [f.name for group in groups for f in fields(group) if f.name not in INERT and f.name != "model_id"]
    out = {name: getattr(s, name) for name in dict.fromkeys(names)
           if not (name in ADDED and getattr(s, name) == ADDED[name])
           and not (name in FOUR_BIT and getattr(s, "quantization", "none") != "4bit")}
    if out.get("chat_template"):
        from alignkit.core.groups import chat_template_text

        out["chat_template"] = chat_template_text(out["chat_template"])  # a file by its text, or inline Jinja
    return out


def model_identity(s, backend: str | None = None, resolved=None) -> dict:
    """The model that settings `s` (ModelSettings or a subclass) load, completely: see the module docstring.
    backend: the resolved generation engine, for a cache of generated text; None where no engine is involved.
    resolved: `s`'s chain already resolved (alignkit.modeling.chain.resolve), else resolved here."""
    loader = loader_fields(s)
    loader.pop("backend", None)  # ENGINE_ONLY
    # Every load keyed here is for inference, where auto loads the model as saved: --quantization none is the same
    # model as auto (label.py generated everything again for it), and the 4-bit format counts under 4bit only.
    if loader.get("quantization") == "none":
        loader["quantization"] = "auto"
    if loader.get("quantization") != "4bit":
        for name in FOUR_BIT:
            loader.pop(name, None)
    if backend != "vllm":
        loader.pop("max_model_len", None)
        from alignkit.core.kernels import loads_as_auto
        from alignkit.core.launch import dtype_choice

        # What auto is on this hardware (part of the identity) is the same model: --dtype fp32 on a CPU finds auto's
        # answers. Not under vLLM, whose auto is the checkpoint's own dtype.
        if loader.get("dtype") not in (None, "auto") and loader["dtype"] == dtype_choice("auto")[0]:
            loader["dtype"] = "auto"
        # Likewise the kernels: an attention that loads auto's (kernels.loads_as_auto), Liger as auto resolves it.
        if loads_as_auto(loader.get("attn_implementation"), loader.get("dtype"), _cuda()):
            loader["attn_implementation"] = "auto"
        if loader.get("use_liger") == "true" or loader.get("use_liger") == "false" and not _liger_runs():
            loader["use_liger"] = "auto"
    from alignkit.modeling.chain import resolve

    if resolved is None:  # once: the chain's content and the libraries that compute it
        resolved = resolve(s.model_id, s.revision)
    chain = chain_identity(s.model_id, s.revision, s.gguf_file, resolved)
    return {"loader": loader, "chain": chain, "backend": backend, "hardware": hardware(),
            "libraries": libraries(backend, _used(s, loader.get("quantization"), chain, resolved))}


def identity_parts(s, identity: dict, chain=None) -> dict[str, str]:
    """The parts of `identity` (model_identity of `s`, over `chain`: its resolved chain, else resolved here), each by
    a short digest, named as a user reads them: the loader settings, each model of the chain by its absolute path or
    Hub id, the hardware and the engine. Recorded beside a cache's key, they name what changed where a kept output is
    refused (a digest of the whole named nothing: the merge/evaluate audit of session 32)."""
    import os

    from alignkit.modeling.chain import resolve

    chain = resolve(s.model_id, s.revision) if chain is None else chain
    names = chain_parts(chain)
    parts = {"loader settings": digest(identity["loader"], 12, ensure_ascii=True)}
    parts.update({os.path.abspath(n) if Path(n).exists() else n: digest(part, 12, ensure_ascii=True)
                  for n, part in zip(names, identity["chain"])})
    # The loader settings themselves too, a chat template by its digest: a refusal names the one that changed.
    fields = {k: digest(v, 12) if k == "chat_template" and v else v for k, v in identity["loader"].items()}
    return {**parts, "hardware": str(identity["hardware"]), "backend": str(identity["backend"]), LOADER_FIELDS: fields}


LOADER_FIELDS = "loader fields"  # identity_parts' record of the loader settings, said by flag where they changed


def _loader_change(then, now) -> str | None:
    """The loader settings that differ between two identity_parts' records of them, as flags; None where either was
    not recorded (made before they were)."""
    if not (isinstance(then, dict) and isinstance(now, dict)):
        return None
    def value(record: dict, k: str) -> str:  # a setting added since is left out at its value before (ADDED)
        if k not in record and k in ADDED:
            return str(ADDED[k])  # it said "--chat_template_kwargs unrecorded then" of answers made with the default
        return "unrecorded" if k not in record else "none" if record[k] is None else str(record[k])

    said = [f"--{k} (the template's text) changed" if k == "chat_template"
            else f"--{k} {value(then, k)} then, {value(now, k)} now"
            for k in [*now, *(k for k in then if k not in now)] if then.get(k) != now.get(k)]
    return ", ".join(said) or None


def moved_parts(then: dict, now: dict) -> dict[str, str]:
    """{a local part's path now: its path then} between two identity_parts records, for the folders of the chain
    found under another path (a copy of runs/, a moved project): a path of one record only, paired in chain order
    with one of the other record only that has the same folder name. Empty where either record is missing."""
    import os

    if not (isinstance(then, dict) and isinstance(now, dict)):
        return {}
    gone = [name for name in then if os.path.isabs(name) and name not in now]
    moved = {}
    for name in (name for name in now if os.path.isabs(name) and name not in then):
        match = next((old for old in gone if Path(old).name == Path(name).name), None)
        if match is not None:
            moved[name] = match
            gone.remove(match)
    return moved


def changed_parts(then: dict, now: dict) -> str | None:
    """What differs between two identity_parts records, in words, a local part by its path from here where under
    it; None where either is missing (made before they were recorded)."""
    import os

    if not (isinstance(then, dict) and isinstance(now, dict)):
        return None

    def shown(name: str) -> str:
        relative = os.path.relpath(name) if os.path.isabs(name) else name
        return name if relative.startswith("..") else relative

    moved = moved_parts(then, now)
    said = []
    for name in [*now, *(k for k in then if k not in now and k not in moved.values())]:
        if name in moved:  # a copy of the folder, or the folder moved: its content decides
            if then[moved[name]] != now[name]:
                said.append(f"{shown(name)}: its files changed since (then at {shown(moved[name])})")
            continue
        if then.get(name) == now.get(name) or name == LOADER_FIELDS:
            continue
        if name == "loader settings":
            which = _loader_change(then.get(LOADER_FIELDS), now.get(LOADER_FIELDS))
            said.append(f"its loader settings ({which or '--dtype, --quantization, the chat template, ...'})")
        elif name in ("hardware", "backend"):
            said.append(f"{name} {then.get(name)} then, {now.get(name)} now")
        else:
            how = "its files changed since" if name in then and name in now else "not in its chain " + (
                "then" if name in now else "now")
            said.append(f"{shown(name)}: {how}")
    return "; ".join(said) or None


def identity_key(s, backend: str | None = None, loaded: dict | None = None) -> str:
    """model_identity (`loaded` where made already) as one short string, for a cache key or a record's `identity`."""
    return digest(model_identity(s, backend) if loaded is None else loaded, 16)
