"""GGUF files as a model source: converted once into a plain model folder, then loaded like any other.

transformers reads GGUF (llama.cpp's format) through the `gguf` package, dequantizing every tensor on load
(Q4_1 -> fp32 takes about 20 s for a 135M model on 2 cores), and such a model cannot be saved again. So the
first use converts: the weights are dequantized once, put into a model rebuilt from the same config without the
GGUF quantization marker, and saved as safetensors with the tokenizer and its chat template. Later uses, in any
script, load that folder in about a second.

Sources (`model_source`):
- a local file: `--model_id path/to/model.gguf`;
- a file in a local folder or a Hub repo: `--model_id FOLDER_OR_REPO --gguf_file NAME.gguf`;
- a Hub file written as one id: `--model_id owner/repo/NAME.gguf` (what an adapter trained on it records).

The cache ($ALIGNKIT_CACHE/gguf/<key>) is keyed by the file's content (size + SHA-256, streamed; the digest
itself is remembered by path, size and mtime, so a 100 MB file is hashed once), the transformers version (its
converter writes the weights) and this module's CONVERTER version. A conversion is written to a temporary folder
and renamed into place, so a crash never leaves a half-written model that a later run would trust, and one
process converts while the others wait (`alignkit.core.paths.build_once`): under accelerate launch with 8 GPUs a 7B
GGUF is dequantized once, not in 8 fp32 copies at the same time.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import UserError
from alignkit.core.paths import build_once
from alignkit.core.sources import hub_gguf

CONVERTER = "v1"  # bump when the conversion below changes what it writes
DONE = "gguf_source.json"  # written last into a converted folder: its presence means the folder is whole


def cache_root() -> Path:
    from alignkit.core.paths import cache_dir

    return cache_dir() / "gguf"


def is_gguf(source: str | None) -> bool:
    return bool(source) and str(source).lower().endswith(".gguf")


def source_id(source: str, gguf_file: str | None = None) -> str:
    """The one string that names a GGUF source without --gguf_file: FOLDER/NAME.gguf for a local folder,
    owner/repo/NAME.gguf for a Hub repo. Adapters record it as their base, so they load and merge without the flag."""
    if not gguf_file or Path(source, "adapter_config.json").is_file():
        return source
    return str(Path(source) / gguf_file) if Path(source).is_dir() else f"{source.rstrip('/')}/{gguf_file}"


def locate(source: str, gguf_file: str | None = None, revision: str | None = None) -> Path | None:
    """The local .gguf file `source` (and `gguf_file`) names, downloaded from the Hub when needed; None when
    the source is not a GGUF one."""
    if gguf_file:
        folder = Path(source)
        if folder.is_dir():
            path = folder / gguf_file
            if not path.is_file():
                raise UserError(f"--gguf_file {gguf_file}: no such file in {folder}")
            return path
        return _download(source, gguf_file, revision)
    if not is_gguf(source):
        return None
    path = Path(source)
    if path.is_file():
        return path
    if path.exists():
        raise UserError(f"{source} is not a file: pass a .gguf file, or a folder with --gguf_file NAME")
    if not (found := hub_gguf(source)):
        raise UserError(f"{source}: no such GGUF file (a Hub file is written owner/repo/NAME.gguf)")
    return _download(*found, revision)


def _download(repo: str, name: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, no such repo or file: say which file was wanted
        raise UserError(f"could not get {name} from the Hub repo {repo} (no local file {repo}/{name} is there "
                        f"either): {type(e).__name__}: {e}") from None


def content_hash(path: Path) -> str:
    """"SIZE-SHA256" of the file's bytes, remembered by path, size and mtime (alignkit.modeling.identity)."""
    from alignkit.modeling.identity import file_hash

    return file_hash(path)


def architecture(path: Path) -> str:
    """The `general.architecture` the GGUF file declares (llama, qwen2, mamba, ...)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (ValueError, OSError, IndexError, KeyError) as error:  # "GGUF magic invalid", a header cut short
        raise _damaged(path, error) from None
    if field is None:
        return "(none declared)"
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def _damaged(path: Path, error: BaseException) -> UserError:
    return UserError(f"{path} is not a whole GGUF file ({type(error).__name__}: {str(error)[:120]}): a download or "
                     "copy cut short, or another kind of file; download or copy it again")


def converted_folder(path: Path) -> Path:
    """Keyed on the file's content and on what reads it: transformers, and the gguf package that dequantizes it."""
    from importlib.metadata import version

    import transformers

    return cache_root() / f"{content_hash(path)[:32]}-tf{transformers.__version__}-gguf{version('gguf')}-{CONVERTER}"


def convert(path: Path) -> Path:
    """The plain model folder for the GGUF file `path`: converted on first use, the cached one afterwards."""
    target = converted_folder(path)
    if (target / DONE).is_file() and _whole(target):
        return target
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    arch = architecture(path)
    try:  # the metadata alone, in a second: an architecture transformers cannot read fails before any work
        load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:
        if "not supported" in str(e):
            raise UserError(
                f"{path}: GGUF architecture {arch!r} cannot be read by transformers {transformers.__version__} "
                f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert the original checkpoint "
                "instead, or pass its Hub id"
            ) from None
        raise _damaged(path, e) from None
    return build_once(target, DONE, lambda work: _convert_into(path, arch, work), current=lambda _: _whole(target))


def _whole(folder: Path) -> bool:
    """A converted folder holds its config and weights (a launch's rank other than 0 once wrote a done file over
    the tokenizer alone: transformers saved no model there)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert_into(path: Path, arch: str, work: Path) -> str:
    """The GGUF file's model and tokenizer as a plain folder in `work`; the text of its done file."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from alignkit.core.zero3 import outside_zero3
    from alignkit.core.progress import bars_by_rule

    logger.info(f"converting {path} ({arch}) into {work.parent} (once; cached for every later run)")
    # Under a ZeRO-3 launch this process alone builds the whole model: not under zero.Init, which would wait for
    # the ranks waiting for this build.
    with outside_zero3():
        # transformers' conversion bar is tqdm's own: alignkit's rule decides it (drawn in a terminal or a notebook).
        with bars_by_rule(gguf_utils):
            try:  # the tensors themselves: a file cut short fails here ("cannot reshape array of size ...")
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
            except (ValueError, OSError, IndexError) as error:
                raise _damaged(path, error) from None
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it from its config without
        # the quantization marker, with the already dequantized weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: converting it lost weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    if tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
    del gguf_model
    # The builder is whichever process took the lock (one per machine): transformers writes nothing on a rank other
    # than 0 once a process group is up, so this process says it writes.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(work)
    tok.save_pretrained(work)
    if not _whole(work):
        raise RuntimeError(f"converting {path} wrote no model into {work} (transformers saved nothing)")
    logger.info(f"converted {path.name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return json.dumps({"source": str(path.resolve()), "content": content_hash(path), "architecture": arch,
                       "transformers": transformers.__version__, "converter": CONVERTER}, indent=2)


def model_source(source: str, gguf_file: str | None = None, revision: str | None = None) -> tuple[str, str | None]:
    """(what from_pretrained should load, its revision): the converted folder for a GGUF source, else
    `source` and `revision` unchanged."""
    path = locate(source, gguf_file, revision)
    if path is None:
        return source, revision
    return str(convert(path)), None
