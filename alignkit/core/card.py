"""The model card (README.md) of a run folder, an adapter or a merged model, through huggingface_hub's
ModelCard/ModelCardData, so the Hub reads its metadata as it reads any other card.

What a card says, from the files the run left in its folder (nothing is guessed, nothing secret is written):

- metadata: the base model (a Hub id; a local base is described in the text, never by its path) and its
  license, inherited from the base's own card (its README.md metadata, in its folder or the Hugging Face cache;
  a Llama or Gemma license binds the derivative too; `unknown` with a note when there is none), the datasets
  (Hub ids), library_name, pipeline_tag (text-generation; text-classification for a reward model), tags, and the
  evaluation results as model-index entries: the held-out reward accuracy of a DPO run or a reward model, and
  MT-Bench / pairwise / AlpacaEval win rates recorded by evaluate.py (`record_evaluation`, EVALS_FILE);
- text: what was trained on what, the merge and its check, the training settings (already redacted when saved),
  the final metrics, the framework versions, a load snippet in the saved dtype with `device_map="auto"`, and
  the citations of the methods used (LoRA, QLoRA, DPO, cDPO, IPO, APO, KTO, SimPO, ORPO, LoTA, GRPO, RLOO, MT-Bench,
  AlpacaEval, TRL)."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

from alignkit.core.args import redact
from alignkit.core.errors import UserError
from alignkit.core.journal import read_json as _read_json
from alignkit.core.mixture import said_held_out
from alignkit.core.run_records import (
    HUB_DATASETS, LOADED_AS, LOADED_CHAIN, NOT_APPLIED_RECORD, RUN_CONFIG, checkpoint_metrics, checkpoints, merge_name,
    recorded_chain, recorded_hub_datasets, run_config,
)
from alignkit.core.sources import hub_gguf, is_hub_id

EVALS_FILE = "alignkit_evals.json"  # evaluation results evaluate.py recorded for a local model folder
RUN_TYPES = {"sft": "SFT", "dpo": "DPO", "kto": "KTO", "reward": "Reward model"}  # rl: GRPO/RLOO (--algo)
REFERENCE_FREE = {"simpo": "SimPO", "orpo": "ORPO"}  # dpo.py's losses that are methods of their own (they run alone)
KTO_LOSSES = {"apo_zero_unpaired": "APO (zero, unpaired)"}  # kto.py's losses that are another paper's method
APO_LOSSES = ("apo_zero", "apo_down")  # dpo.py's (TRL's) APO losses, beside DPO's
FRAMEWORKS = ("alignkit", "transformers", "trl", "peft", "torch", "datasets", "tokenizers", "accelerate",
              "bitsandbytes")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

CITATIONS = {
    "LoRA": ("hu2021lora", "LoRA: Low-Rank Adaptation of Large Language Models",
             "Edward J. Hu and Yelong Shen and Phillip Wallis and Zeyuan Allen-Zhu and Yuanzhi Li and Shean Wang and "
             "Lu Wang and Weizhu Chen", 2021, "2106.09685"),
    "QLoRA": ("dettmers2023qlora", "QLoRA: Efficient Finetuning of Quantized LLMs",
              "Tim Dettmers and Artidoro Pagnoni and Ari Holtzman and Luke Zettlemoyer", 2023, "2305.14314"),
    "DPO": ("rafailov2023direct", "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
            "Rafael Rafailov and Archit Sharma and Eric Mitchell and Stefano Ermon and Christopher D. Manning and "
            "Chelsea Finn", 2023, "2305.18290"),
    "cDPO": ("mitchell2023note", "A note on DPO with noisy preferences and relationship to IPO", "Eric Mitchell",
             2023, None),
    "IPO": ("azar2023general", "A General Theoretical Paradigm to Understand Learning from Human Preferences",
            "Mohammad Gheshlaghi Azar and Mark Rowland and Bilal Piot and Daniel Guo and Daniele Calandriello and "
            "Michal Valko and Rémi Munos", 2023, "2310.12036"),
    "KTO": ("ethayarajh2024kto", "KTO: Model Alignment as Prospect Theoretic Optimization",
            "Kawin Ethayarajh and Winnie Xu and Niklas Muennighoff and Dan Jurafsky and Douwe Kiela", 2024,
            "2402.01306"),
    "APO": ("doosterlinck2024anchored", "Anchored Preference Optimization and Contrastive Revisions: Addressing "
            "Underspecification in Alignment", "Karel D'Oosterlinck and Winnie Xu and Chris Develder and Thomas "
            "Demeester and Amanpreet Singh and Christopher Potts and Douwe Kiela and Shikib Mehri", 2024,
            "2408.06266"),
    "SimPO": ("meng2024simpo", "SimPO: Simple Preference Optimization with a Reference-Free Reward",
              "Yu Meng and Mengzhou Xia and Danqi Chen", 2024, "2405.14734"),
    "ORPO": ("hong2024orpo", "ORPO: Monolithic Preference Optimization without Reference Model",
             "Jiwoo Hong and Noah Lee and James Thorne", 2024, "2403.07691"),
    "LoTA": ("panda2024lottery", "Lottery Ticket Adaptation: Mitigating Destructive Interference in LLMs",
             "Ashwinee Panda and Berivan Isik and Xiangyu Qi and Sanmi Koyejo and Tsachy Weissman and Prateek Mittal",
             2024, "2406.16797"),
    "Bradley-Terry reward model": ("ouyang2022training", "Training language models to follow instructions with "
                                   "human feedback", "Long Ouyang and Jeff Wu and Xu Jiang and others", 2022,
                                   "2203.02155"),
    "self-reference reward loss": ("bao2024aligning", "Aligning Large Language Models from Self-Reference AI "
                                   "Feedback with one General Principle", "Rong Bao and Rui Zheng and Shihan Dou and "
                                   "Xiao Wang and Enyu Zhou and Bo Wang and Qi Zhang and Liang Ding and Dacheng Tao",
                                   2024, "2406.11190"),
    "GRPO": ("shao2024deepseekmath", "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language "
             "Models", "Zhihong Shao and Peiyi Wang and Qihao Zhu and others", 2024, "2402.03300"),
    "RLOO": ("ahmadian2024back", "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human "
             "Feedback in LLMs", "Arash Ahmadian and Chris Cremer and Matthias Gallé and others", 2024, "2402.14740"),
    "MT-Bench": ("zheng2023judging", "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena",
                 "Lianmin Zheng and Wei-Lin Chiang and Ying Sheng and others", 2023, "2306.05685"),
    "AlpacaEval": ("dubois2024length", "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators",
                   "Yann Dubois and Balázs Galambosi and Percy Liang and Tatsunori B. Hashimoto", 2024, "2404.04475"),
    "TRL": ("vonwerra2020trl", "TRL: Transformer Reinforcement Learning", "Leandro von Werra and Younes Belkada and "
            "Lewis Tunstall and Edward Beeching and Tristan Thrush and Nathan Lambert and Shengyi Huang and Kashif "
            "Rasul and Quentin Gallouédec", 2020, None),
}


def _shown(value):
    """A setting as a card shows it: a local absolute path by its last part only (it means nothing elsewhere),
    inside a mapping or a list too (a dataset_mixture's ids, resumed_over's changes printed them whole)."""
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", value)):
        return f".../{Path(value).name}"
    return value


def _names(parts: list[str]) -> list[str]:
    """Parts of a chain as a card names them: a Hub id whole, a local folder by its name (never its path)."""
    return [part if is_hub_id(part) else Path(part).name for part in parts]


def base_source(folder) -> tuple[str, list[str], str | None]:
    """(the base model as recorded: Hub id or local path, or ""; names of the local adapters under this one; the
    Hub revision the base loads at, None for the default branch)."""
    from alignkit.modeling.chain import resolve

    folder = Path(folder)
    merge = _read_json(folder / "merge.json")
    under: list[str] = []
    revision = None
    loaded = recorded_chain(folder) if not merge else None
    if merge:
        base, revision = merge.get("base_model") or "", merge.get("base_revision")
    elif loaded:  # as the run loaded it: no Hub request at every save
        base, revision = loaded["base"], loaded.get("revision")
        under = _names([*loaded.get("deltas", []), *loaded.get("adapters", [])])
    elif (folder / "adapter_config.json").is_file():
        try:
            chain = resolve(str(folder))
            base, revision = chain.base, chain.revision
            under = _names([*chain.deltas, *chain.adapters[:-1]])
        except (UserError, OSError, ValueError):  # a broken chain still gets a card naming what it records
            base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path") or ""
    else:
        settings = _read_json(folder / "alignkit_config.json")
        base, revision = settings.get("model_id") or "", settings.get("revision")
        if base and Path(base, "adapter_config.json").is_file():  # a run still training on top of an adapter
            try:
                chain = resolve(base, revision)
                base, revision = chain.base, chain.revision
                under = _names([*chain.deltas, *chain.adapters])
            except (UserError, OSError, ValueError):  # named as the run recorded it
                pass
    return base, under, revision


def describe_base(folder) -> tuple[str | None, str, list[str]]:
    """(Hub id of the base model or None, how a card names the base, names of local adapters under this one).

    A local base is "a local model" with its architecture and folder name from its config.json, never its path.
    """
    base, under, revision = base_source(folder)
    if is_hub_id(base) and revision:
        return base, f"[{base}](https://huggingface.co/{base}/tree/{revision}) at revision `{revision}`", under
    if is_hub_id(base):
        return base, f"[{base}](https://huggingface.co/{base})", under
    if found := hub_gguf(base):  # a Hub repo's GGUF file: the repo is the base's id, the file which of its weights
        repo, name = found
        return repo, (f"[{repo}](https://huggingface.co/{repo}), its GGUF file `{name}` (quantized weights dequantized"
                      " to load)"), under
    config = _read_json(Path(base, "config.json")) if base else {}
    kind = ", ".join(x for x in [(config.get("architectures") or [None])[0], config.get("model_type")] if x)
    if not base:
        return None, "a base model this folder does not record", under
    if base.lower().endswith(".gguf"):  # a file: its quantized weights, dequantized as they loaded
        return None, f"a local GGUF file (`{Path(base).name}`, its quantized weights dequantized to load)", under
    return None, f"a local model ({kind + '; ' if kind else ''}folder `{Path(base).name}`)", under


def _before_cast(merge: dict) -> str:
    """Where the merged weights are saved in another precision than the check ran in: its figure is not theirs."""
    check, saved = merge.get("check_dtype", "float32"), merge.get("dtype")
    if not saved or saved == check:
        return ""
    return f" (checked in {check}, before the weights were cast to {saved} to be saved: {saved} rounds them further)"


def base_license(base: str) -> dict:
    """{license, license_name, license_link} from the base's own card: README.md in its folder, or in the
    Hugging Face cache for a Hub id (never fetched: a card is written offline too). {} when there is none."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme = None
    if base and Path(base, "README.md").is_file():
        readme = Path(base, "README.md")
    elif is_hub_id(base):
        cached = try_to_load_from_cache(base, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return {}
    try:
        data = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data
    except Exception:  # noqa: BLE001 - a base card we cannot parse gives no license, not a failed push
        return {}
    return {k: getattr(data, k, None) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


def record_evaluation(source, name: str, entry: dict) -> None:
    """Keep an evaluation result (a win rate, ...) in a local model folder's EVALS_FILE, under `name`, for its
    card. A Hub id or a file (a GGUF) is not a folder alignkit wrote: nothing is recorded there."""
    from filelock import FileLock

    from alignkit.core.journal import write_json

    folder = Path(str(source))
    if not folder.is_dir() or not any((folder / f).is_file() for f in ("config.json", "adapter_config.json",
                                                                       "alignkit_config.json", "merge.json")):
        return
    # Two evaluations of one model at once (MT-Bench beside AlpacaEval) each read, add and write: one at a time, or
    # the later write drops the other's result. The lock lies in alignkit's cache, not in the model's folder.
    from alignkit.core.digests import digest
    from alignkit.core.paths import cache_dir

    locks = cache_dir() / "eval-locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{digest(str(folder.resolve()), 16)}.lock")):
        results = _read_json(folder / EVALS_FILE)
        results[name] = entry
        write_json(folder / EVALS_FILE, results)
        _refresh_card(folder, name)


def _refresh_card(folder: Path, name: str) -> None:
    """The folder's card, rewritten to show the result `name` just recorded, where alignkit wrote that card."""
    from huggingface_hub import ModelCard

    from alignkit import logger
    from alignkit.core.journal import write_atomic

    card = folder / "README.md"
    try:  # the folder's card shows it now, not at the next merge or push; a card alignkit did not write stays
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
        if text and "alignkit" in (ModelCard(text, ignore_metadata_errors=True).data.tags or []):
            write_atomic(card, model_card(folder, _pushed_to(text)))
    except Exception as error:  # noqa: BLE001 - the result is kept (EVALS_FILE); the card shows it at the next write
        logger.warning(f"{card}: not updated with {name} ({type(error).__name__}: {error}); the result is kept in "
                       f"{folder / EVALS_FILE}")


def write_card(folder, in_progress: bool = False) -> None:
    """alignkit's card as `folder`'s README.md, written whole (a kill leaves the card before it, never half of one):
    a run folder's as the run starts and at each checkpoint (`in_progress`), where TRL's trainers wrote their own (a
    local base named "None"), and each checkpoint-N's over PEFT's (a local base by its path). A card that cannot be
    made is a warning, never a stopped training: the run's end writes it again."""
    from alignkit import logger
    from alignkit.core.journal import write_atomic

    card = Path(folder) / "README.md"
    try:
        write_atomic(card, model_card(folder, in_progress=in_progress))
    except Exception as error:  # noqa: BLE001 - a card is no reason to lose a run
        logger.warning(f"{card}: alignkit's model card was not written ({type(error).__name__}: {error})")


def _pushed_to(card_text: str) -> str | None:
    """The Hub repo a card written at a push loads from (hub.push writes the repo id into its snippet); None for a
    folder's own card (path/to/NAME): a result recorded after a push keeps the card's repo id."""
    found = re.search(r'(?:model_id=|from_pretrained\()"([^"]+)"', card_text)
    return found.group(1) if found and not found.group(1).startswith("path/to/") else None


def eval_results(folder, run_type: str | None, metrics: dict, dataset: str, dataset_name: str,
                 held_out: dict | None = None) -> list:
    """huggingface_hub EvalResults: the held-out reward accuracy (on the split it was measured on, where the run
    recorded one: `held_out` in alignkit_config.json), and what evaluate.py recorded."""
    from huggingface_hub import EvalResult

    split = (held_out or {}).get("split")  # a share of the training rows, or some rows of a split: none to name
    split = split if isinstance(split, str) and split and not held_out.get("of_rows") else "held-out"

    results = []
    task = "text-classification" if run_type == "reward" else "text-generation"
    accuracy = metrics.get("held_out_accuracy", metrics.get("eval_accuracy")) if run_type == "reward" else \
        metrics.get("eval_rewards/accuracies")
    if isinstance(accuracy, (int, float)):
        results.append(EvalResult(
            task_type=task, dataset_type=dataset, dataset_name=f"{dataset_name} (held-out pairs)",
            dataset_split=split, metric_type="accuracy", metric_value=round(float(accuracy), 4),
            metric_name="held-out reward accuracy" if run_type != "reward" else "held-out pairwise accuracy"))
    for name, entry in sorted(_read_json(Path(folder) / EVALS_FILE).items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)):
            continue
        results.append(EvalResult(
            task_type="text-generation", dataset_type=entry.get("dataset", name), dataset_name=entry.get(
                "benchmark", name), metric_type=entry.get("metric", "win_rate"),
            metric_value=round(float(entry["value"]), 4), metric_name=entry.get("metric_name")))
    return results


def methods(settings: dict, run_type: str | None, folder: Path, below: list[dict] = ()) -> list[str]:
    """The methods the card cites, from the recorded settings (and those of the runs `below` it in a merged chain:
    an SFT run with QLoRA under a DPO run without) and evaluations."""
    used = ["LoTA"] if settings.get("adapter") == "lota" or (folder / "lota_config.json").is_file() else ["LoRA"]
    # As the loader loaded it (`auto` is 4-bit QLoRA on CUDA), else as asked (a run saved before the record).
    if any((run.get(LOADED_AS) or {}).get("quantization", run.get("quantization")) == "4bit"
           for run in (settings, *below)):
        used.append("QLoRA")
    if run_type == "kto":  # TRL's KTOTrainer, with KTO's loss or APO-zero's unpaired variant
        used.append("APO" if settings.get("loss_type") in KTO_LOSSES else "KTO")
    if run_type == "dpo":
        losses = settings.get("loss_type") or ["sigmoid"]
        used += [REFERENCE_FREE[loss] for loss in losses if loss in REFERENCE_FREE]
        if any(loss not in ("ipo", *REFERENCE_FREE) for loss in losses):
            used.append("DPO")
        if settings.get("label_smoothing"):
            used.append("cDPO")
        if "ipo" in losses:
            used.append("IPO")
        if any(loss in APO_LOSSES for loss in losses):
            used.append("APO")
    elif run_type == "reward":
        used.append("Bradley-Terry reward model")
        if settings.get("loss") == "logexpwithlm":  # the self-reference code's loss: margins plus the chosen's LM term
            used.append("self-reference reward loss")
    elif run_type == "rl":
        used.append((settings.get("algo") or "grpo").upper())
    evaluated = " ".join(_read_json(folder / EVALS_FILE))
    used += [m for m, key in (("MT-Bench", "mt_bench"), ("AlpacaEval", "alpaca_eval")) if key in evaluated]
    return [*used, "TRL"]


def _versions() -> list[str]:
    found = []
    for name in FRAMEWORKS:
        try:
            found.append(f"- {name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def _bibtex(name: str) -> str:
    key, title, authors, year, arxiv = CITATIONS[name]
    extra = f",\n  journal = {{arXiv preprint arXiv:{arxiv}}}" if arxiv else ""
    return f"@article{{{key},\n  title = {{{title}}},\n  author = {{{authors}}},\n  year = {{{year}}}{extra}\n}}"


def _load_snippet(where: str, is_adapter: bool, under: list[str], reward: bool, dtype: str) -> list[str]:
    if is_adapter and under:  # PEFT loads one adapter on a base; alignkit's loader follows the chain
        return ["from alignkit.core.config import ModelSettings", "from alignkit.modeling.models import load_model",
                "", f'loaded = load_model(ModelSettings(model_id="{where}"))',
                "model, tokenizer = loaded.model, loaded.tokenizer"]
    torch_dtype = "\"auto\"" if dtype == "auto" else f"torch.{dtype}"
    head = ["import torch"] if dtype != "auto" else []
    if is_adapter:
        cls = "AutoPeftModelForSequenceClassification" if reward else "AutoPeftModelForCausalLM"
        head += [f"from peft import {cls}", "from transformers import AutoTokenizer"]
    else:
        cls = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
        head += [f"from transformers import {cls}, AutoTokenizer"]
    return head + ["", f'model = {cls}.from_pretrained("{where}", dtype={torch_dtype}, device_map="auto")',
                   f'tokenizer = AutoTokenizer.from_pretrained("{where}")']


# What a run records beside its settings in alignkit_config.json (alignkit.train.run_folder.save_run_config), left
# out of the card: none is a setting, and some name local paths (the folders it trained over).
RECORDED_BESIDE = ("inputs", "trained_over", "data_rows", "held_out", HUB_DATASETS, LOADED_AS, LOADED_CHAIN,
                   NOT_APPLIED_RECORD)
LOADED_ROWS = {"quantization": "quantization", "dtype": "dtype", "attn_implementation": "attention"}  # LOADED_AS's
# The settings a --dataset_mixture takes the place of (alignkit.core.mixture): a run with one never read them.
MIXED_OVER = ("dataset_id", "dataset_config", "dataset_split")


def _chat_template(folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` has a chat template; True where no tokenizer was saved there."""
    config = _read_json(folder / "tokenizer_config.json")
    return not config or bool(config.get("chat_template")) or any(folder.glob("chat_template.*"))


def model_card(folder, repo_id: str | None = None, in_progress: bool = False, at=None) -> str:
    """README.md for a run folder, an adapter or a merged model, from the files the run left there.

    repo_id: the Hub repo it is pushed to; None for the card a run folder keeps for itself.
    in_progress: a run folder whose run is training now: a finished run trained further (--resume true over changed
    settings, a higher --max_steps) still holds its old adapter and metrics.json, which the card read as final.
    at: where `folder` is about to be moved (a merge written beside its place), which names the model.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    settings = run_config(folder)  # already redacted when saved; a checkpoint-N's are its run's
    # A checkpoint's own figures at its step (alignkit.core.run_records), where no metrics.json holds them yet.
    metrics = _read_json(folder / "metrics.json") or checkpoint_metrics(folder)
    merge = _read_json(folder / "merge.json")
    adapter = _read_json(folder / "adapter_config.json")
    # A run folder while it trains, or stopped before its end: no weights here yet; its checkpoints hold them.
    training = bool(settings) and (in_progress or not (merge or adapter)) and (folder / RUN_CONFIG).is_file() and \
        not (folder / "lota_config.json").is_file()
    saved = checkpoints(folder) if training else []
    if training and in_progress or saved and not metrics:  # in progress: this run's figures, not an earlier end's
        metrics = checkpoint_metrics(saved[-1]) if saved else {}
    is_adapter = (bool(adapter) and not merge) or (training and settings.get("adapter", "lora") != "lota")
    base, _, _ = base_source(folder)
    hub_base, base_text, under = describe_base(folder)
    where = repo_id or f"path/to/{merge_name(folder, at)}"  # a merge in its run's merged/: the run's name, not `merged`
    # Every run of the chain trained on its own data (an SFT run under a DPO run): their Hub datasets, in order.
    runs = [*merge.get("lota_deltas", []), *merge.get("adapters", [])] if merge else []
    recorded = [_read_json(Path(run) / "alignkit_config.json") for run in runs]  # each run's settings, read once
    dataset = settings.get("dataset_id", "") or ""
    hub_dataset = dataset if dataset in recorded_hub_datasets(settings) else None
    # As each run recorded them where it ran: a relative local path read from here could look like a Hub id.
    hub_datasets = list(dict.fromkeys(d for run in [*recorded, settings] for d in recorded_hub_datasets(run)))
    run_type = settings.get("run_type")  # what training recorded (alignkit.train.training.save_run_config)
    reward = run_type == "reward" or merge.get("kind") == "reward model" or adapter.get("task_type") == "SEQ_CLS"
    if not settings:
        stage = "merged adapters"
    elif run_type == "rl":
        stage = (settings.get("algo") or run_type).upper()
    elif run_type == "dpo" and len(losses := settings.get("loss_type") or []) == 1 and losses[0] in REFERENCE_FREE:
        stage = REFERENCE_FREE[losses[0]]
    elif run_type == "kto" and settings.get("loss_type") in KTO_LOSSES:
        stage = KTO_LOSSES[settings["loss_type"]]
    else:
        stage = RUN_TYPES.get(run_type, "Fine-tuning")
    below = recorded[:-1] if settings else []
    cited = methods(settings, run_type, folder, below)
    license_ = base_license(base)
    tags = ["alignkit", "trl", "lota" if "LoTA" in cited else "lora", stage.split()[0].lower()]
    tags += [m.lower() for m in cited if m in ("cDPO", "IPO", "APO", "QLoRA", "KTO", "SimPO", "ORPO") and m != stage]
    tags = list(dict.fromkeys(tags))  # apo: the stage's tag and the method's
    data = ModelCardData(
        base_model=hub_base, datasets=hub_datasets or None,
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-classification" if reward else "text-generation", tags=tags,
        license=license_.get("license") or "unknown", license_name=license_.get("license_name"),
        license_link=license_.get("license_link"),
    )
    named = "dataset mixture" if settings.get("dataset_mixture") else Path(dataset).name or "custom"  # its id unread
    results = eval_results(folder, run_type, metrics, hub_dataset or "custom", named, settings.get("held_out"))
    if results:  # model-index entries, under the model's name (which the metadata holds only there)
        data.eval_results, data.model_name = results, where.split("/")[-1]
    on_top = f", on top of the adapter{'s' if len(under) > 1 else ''} {', '.join(f'`{a}`' for a in under)}" if under else ""
    deltas, adapters = merge.get("lota_deltas", []), merge.get("adapters", [])
    kind = ("LoRA adapters over a LoTA sparse delta" if deltas and adapters else "a LoTA sparse delta"
            if deltas or "LoTA" in cited else "LoRA adapters")
    lines = [f"# {where.split('/')[-1]}", "", f"{stage} of {base_text}{on_top} with {kind}, trained with alignkit on "
             "Hugging Face TRL."]
    if training:
        latest = f"its latest checkpoint is `{saved[-1].name}`, which the same command resumes from" if saved else \
            "no checkpoint is saved yet"
        lines += ["", f"This run has not finished (it is training, or it stopped): its weights are saved in this "
                      f"folder when it ends; {latest}."]
    if license_:
        lines += ["", f"License: `{license_['license']}`, inherited from the base model's card: its terms apply to "
                      "this derivative too."]
    else:
        lines += ["", "License: `unknown`: the base model's card (README.md in its folder or the Hugging Face cache) "
                      "names none. Set `license:` above to the base model's license before publishing."]
    if merge:
        parts = [*(f"the LoTA delta `{_shown(d)}`" for d in deltas), *(f"`{_shown(a)}`" for a in adapters)]
        four_bit = merge.get("dequantized_from") or "4-bit NF4"  # NF4 in a merge made before merge.json said
        lines += ["", f"Merged into the base: {' -> '.join(parts)}"
                      f"{f' (into the base dequantized from {four_bit})' if merge.get('dequantize') else ''}; merged logits "
                      f"match base + adapters within {merge.get('max_logit_difference', 0):.1e}"
                      f"{_before_cast(merge)}."]
    if data.eval_results:
        lines += ["", "## Evaluation", "", "| task | dataset | metric | value |", "| --- | --- | --- | --- |"]
        lines += [f"| {r.task_type} | {r.dataset_name} | {r.metric_name or r.metric_type} | {r.metric_value} |"
                  for r in data.eval_results]
    if settings:
        lines += ["", "## Training settings", "", "| setting | value |", "| --- | --- |"]
        held, dropped = settings.get("held_out"), settings.get(NOT_APPLIED_RECORD) or {}
        # Left out, having had no effect: the script's defaults under a mixture, --eval_split where a split was held
        # out, logexpwithlm's LM weight under another loss, the Hub's without a push, the keys not applied (below)
        unread = {*RECORDED_BESIDE, *dropped, *(MIXED_OVER if settings.get("dataset_mixture") else ()),
                  *(("eval_split",) if isinstance(held, dict) and held.get("share") is None else ()),
                  *(("lm_loss_coef",) if run_type == "reward" and settings.get("loss") != "logexpwithlm" else ()),
                  *(() if settings.get("push_to_hub") else ("hub_repo_id", "hub_public"))}
        loaded = settings.get(LOADED_AS) or {}  # in the rows of the settings it resolved: auto, or what could run
        ran = {k: f" asked; `{loaded[r]}` loaded" for k, r in LOADED_ROWS.items()
               if loaded.get(r) and loaded[r] != DTYPES.get(settings.get(k), settings.get(k))}
        lines += [f"| {k} | `{json.dumps(_shown(v))}`{ran.get(k, '')} |" for k, v in settings.items()
                  if v not in (None, "", [], False) and k not in unread]
        if held := said_held_out(held):  # dataset_test_split auto, as it resolved
            lines.append(f"| held-out rows | {held} |")
        if isinstance(dropped, dict) and dropped:  # a recipe's max_prompt_length, a local model's revision
            shown = [f"`{k}: {json.dumps(_shown(v.get('value')))}` ({v.get('why')})" for k, v in dropped.items()
                     if isinstance(v, dict)]
            lines += ["", "Given but not applied: " + "; ".join(shown)]
    if metrics:
        heading = f"Metrics at {metrics['checkpoint']}" if metrics.get("checkpoint") else "Final metrics"
        lines += ["", f"## {heading}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    dtype = merge.get("dtype") if merge else "auto"  # an adapter loads on its base in the base's saved dtype
    lines += ["", "## How to load it", "", "```python", *_load_snippet(where, is_adapter, under, reward, dtype or "auto")]
    if not reward and not _chat_template(folder):  # trained on plain text (TRL's standard format), no template
        lines += ['inputs = tokenizer("Hello!", return_tensors="pt").to(model.device)',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=128)[0]))"]
    elif not reward:
        lines += ['messages = [{"role": "user", "content": "Hello!"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                  "return_dict=True).to(model.device)",
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=128)[0]))"]
    lines += ["```", "", "## Framework versions", "", *_versions(), "", "## Citations", "",
              f"Methods used: {', '.join(cited)}.", ""]
    for name in cited:
        lines += ["```bibtex", _bibtex(name), "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    text = redact(str(card))
    ModelCard(text)  # the Hub's own parser reads it back (model-index included), or this raises now, not on the Hub
    return text

