"""reward.py's logic: the reward losses, margins from the data, TRL's RewardTrainer with them, held-out reports.

A reward model maps a conversation to one number, r = r(x, y), read by a one-output score head on the last
token. On a pair (chosen y_c, rejected y_r) with rewards r_c, r_r and a margin m (`with_margins`: the data's
'margin' column, as TRL reads it, or with --use_margin true its scores' difference; else 0):

- `bradley_terry` (TRL's RewardTrainer loss, the same expression):  L = mean(−log σ(r_c − r_r − m))
- `logexp` (OpenRLHF's LogExpLoss):                                 L = mean(log(1 + exp(r_r − r_c + m)))
  Equal in value to bradley_terry, since −log σ(z) = log(1 + e^(−z)); kept so the seed's configurations read
  the same.
- `logexpwithlm` (the self-reference code's loss):                  L = mean(log(1 + exp(m + r_r − r_c)))
                                                                        + c_lm · CE_LM(y_c)
  where CE_LM is the mean next-token cross-entropy over the chosen conversation's tokens (prompt and answer, as
  the model reads them), from the base's own LM head kept frozen beside the score head, and c_lm is
  --lm_loss_coef (the seed's default 1e-6 leaves the term negligible; 0 turns it off and gives logexp).

With --center_rewards_coefficient c (TRL's), any loss adds c · mean((r_c + r_r)²), which keeps rewards near 0.

The margin m of a row is its `margin` column, else the difference of the scores it carries for the two answers
(`score_chosen − score_rejected` as UltraFeedback has them, `chosen_score − rejected_score` as label.py's
reward-model labels have them, `chosen_grade − rejected_grade` as its `--grade_pairs` pairs have them).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from trl import RewardTrainer

from alignkit import logger
from alignkit.core.data import DataError
from alignkit.train.resuming import EndsAtMaxSteps

LOSSES = ("bradley_terry", "logexp", "logexpwithlm")
ROW = "alignkit_held_out_row"  # a held-out pair's row number, through TRL's preparation (held_out_report)
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen_score", "rejected_score"),
                 ("chosen_grade", "rejected_grade"))  # UltraFeedback's; label.py's pairs; its --grade_pairs


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, loss: str, margin: torch.Tensor | None = None,
                lm_loss: torch.Tensor | None = None, lm_loss_coef: float = 0.0,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """The scalar loss of a batch of pairs; the formulas are in this module's docstring."""
    m = margin if margin is not None else torch.zeros_like(chosen)
    if loss == "bradley_terry":
        value = -F.logsigmoid(chosen - rejected - m).mean()
    elif loss == "logexp":
        value = F.softplus(rejected - chosen + m).mean()  # log(1 + e^x), without overflow for large x
    elif loss == "logexpwithlm":
        value = F.softplus(m + rejected - chosen).mean()
        if lm_loss is not None and lm_loss_coef:
            value = value + lm_loss_coef * lm_loss
    else:
        raise ValueError(f"unknown reward loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if center_rewards_coefficient:
        value = value + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return value


# ---------------------------------------------------------------------------------------------------------
# Margins


def _number(row: dict, column: str, where: str) -> float:
    """A margin or score cell as a float. Text that holds a number counts (a CSV has no other kind of cell, and
    JSON exports sometimes quote numbers); anything else, or a NaN or infinity, is refused by its row and field."""
    value = row.get(column)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return number
    elif not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise DataError(f"{where}: field '{column}': expected a number (--use_margin reads it), got {value!r}. "
                    "Fix the row, or pass --use_margin false")


def margins(source, split="train", config_name=None, rows_kept: list[int] | None = None) -> list[float]:
    """Each row's margin, in the data's row order: the `margin` column, else a score difference (see above); only
    of `rows_kept` (the row numbers of the pairs --skip_invalid kept) when given. A bad cell is named by the row's
    place as alignkit.core.data_files keeps it (a JSON-lines file's line, past blank ones), as every other data
    error is."""
    from alignkit.core.data import read_rows

    return _margins(read_rows(source, split, config_name), rows_kept)


def _margins(read, rows_kept: list[int] | None = None, skipped: list[str] | None = None) -> list[float | None]:
    """margins() of rows already read (alignkit.core.data.read_rows). `skipped`, a list (--skip_invalid): a row
    whose margin is bad gets None in its place and its problem appended, instead of stopping the run."""
    rows = read.dicts()
    numbers = range(len(rows)) if rows_kept is None else rows_kept
    column = _margin_source(read)
    if column == "margin":
        def one(i):
            return _number(rows[i], "margin", read.place(i))
    else:
        chosen, rejected = column

        def one(i):
            return _number(rows[i], chosen, read.place(i)) - _number(rows[i], rejected, read.place(i))
    values = []
    for i in numbers:
        try:
            values.append(one(i))
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            values.append(None)
    return values


def _margin_source(read):
    """Where the rows' margins come from: "margin" (the column), else the (chosen, rejected) score columns."""
    columns = set(read.columns())
    if "margin" in columns:
        return "margin"
    for chosen, rejected in SCORE_COLUMNS:
        if {chosen, rejected} <= columns:
            return chosen, rejected
    raise DataError(
        f"{read.label}: --use_margin needs a 'margin' column, or scores of both answers ("
        + " or ".join(f"{c}/{r}" for c, r in SCORE_COLUMNS) + f"); the columns are {', '.join(sorted(columns))}. "
        "Add one, or pass --use_margin false"
    )


def with_margins(preferences, s, kept: list[int] | None = None, split: str | None = None, read=None):
    """The normalised pairs with a `margin` column (TRL's collator passes it on): the data's own under --use_margin
    auto, else with true a score difference where there is none (`margins`), read from `split`'s rows (default
    --dataset_split; a --dataset_test_split's pairs get their own rows' margins): `read`, those rows as the pairs
    were read from them (alignkit.core.data.read_rows), else read here. `kept`: each pair's source row
    (alignkit.core.data.load_preferences' `kept`), so that a pair keeps its own row's margin where --skip_invalid
    skipped rows before it; under --skip_invalid a pair whose margin is bad is skipped too, as any bad row is."""
    from alignkit.core.data import read_rows
    from alignkit.core.data_files import skipped_rows

    use = str(s.use_margin).lower()  # auto: a 'margin' column where the data has one, as TRL's RewardTrainer reads it
    if use == "false":
        return preferences
    split = split or s.dataset_split
    read = read or read_rows(s.dataset_id, split, s.dataset_config, getattr(s, "skip_invalid", False))  # once
    if use == "auto" and "margin" not in read.columns():
        return preferences
    of = "" if split == s.dataset_split else f" (split {split})"
    source = _margin_source(read)
    said = ("its 'margin' column" if source == "margin" else f"{source[0]} − {source[1]}, its scores' difference")
    logger.info(f"{s.dataset_id}{of}: each pair's margin, {said}, is subtracted from its reward difference, as TRL's "
                f"RewardTrainer does (--use_margin {use}; false: trained without it)")
    skipped = [] if getattr(s, "skip_invalid", False) else None
    values = _margins(read, kept, skipped)
    if len(values) != len(preferences):  # a caller that kept no row numbers, after rows were skipped
        raise DataError(f"{s.dataset_id}: {len(values) - len(preferences)} rows were skipped as invalid "
                        "(--skip_invalid) without their row numbers, so their margins do not line up with the pairs")
    if not skipped:
        return preferences.add_column("margin", values)
    good = [n for n, value in enumerate(values) if value is not None]  # a pair and its margin left out together
    skipped_rows(read.label, skipped, len(values), len(good))
    return preferences.add_column("margin", [0.0 if v is None else v for v in values]).select(good)


def pairs_loader(s):
    """reward.py's loader of one split (alignkit.core.mixture.load_train_eval's `load`): its pairs, each with its
    own row's margin (`with_margins`), so a --dataset_test_split's held-out pairs carry theirs as the training
    pairs do. The split's rows are read once, for the pairs and their margins."""
    from alignkit.core.data import load_preferences, read_rows

    def load(source, format, split, skip_invalid, config_name):
        read = read_rows(source, split, config_name, skip_invalid)  # a line of invalid JSON skipped too
        kept = []  # each pair's row in the split: its margin's (--skip_invalid may skip rows)
        pairs = load_preferences(read, format, split, skip_invalid, config_name, kept=kept)
        return with_margins(pairs, s, kept, split, read)

    return load


def zero_fresh_score_head(model, model_id: str) -> None:
    """Start a score head that the checkpoint did not have (a causal LM's) at zero: every reward starts at 0.

    The head's random draw otherwise decides much of the outcome: on the tiny preset, held-out accuracy over
    four seeds ranged 0.86-0.95 with random heads, 0.91-0.93 with zero ones. The LoRA update and the head
    still learn (the head's gradient is the hidden state, and once it moves, the LoRA update's does too).
    """
    from alignkit.modeling.reward_models import CAUSAL, model_kind

    head = getattr(model, "score", None)  # the name transformers gives it on decoder-only models
    if not (model_kind(model_id) == CAUSAL and isinstance(head, torch.nn.Linear)):
        return
    if hasattr(head.weight, "ds_id"):  # built under ZeRO-3's zero.Init: each rank holds a partition, .data is empty
        import deepspeed

        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=0):  # rank 0's zeros go to every shard
            torch.nn.init.zeros_(head.weight)
        return
    # FSDP's RAM-efficient loading leaves ranks > 0 on the meta device: rank 0's zeros reach them when FSDP wraps
    # the model (sync_module_states), as every other weight does.
    torch.nn.init.zeros_(head.weight)


# ---------------------------------------------------------------------------------------------------------
# The trainer


class AlignRewardTrainer(EndsAtMaxSteps, RewardTrainer):
    """TRL's RewardTrainer with the three losses of this module.

    For logexpwithlm with a non-zero --lm_loss_coef, `lm_head` is the base's LM head (frozen, not saved): the
    score head's input (the final hidden states) is caught by a forward hook and fed to it for the LM term.
    """

    def __init__(self, *args, loss: str = "bradley_terry", lm_loss_coef: float = 0.0, lm_head=None, **kwargs):
        from alignkit.modeling.models import keep_trainable_fp32

        from alignkit.train.trainers import CheckpointBase, check_kept, keep_lora_dropout, row_count, trl_arguments

        from alignkit.modeling import template_rows

        kwargs = trl_arguments(RewardTrainer, args, kwargs)  # positional ones too: eval_dataset is replaced below
        # held_out_report finds the pairs TRL kept, and takes them only for these very pairs (their fingerprint)
        self.held_out_fingerprint = getattr(kwargs.get("eval_dataset"), "_fingerprint", None)
        kwargs["eval_dataset"] = _numbered(kwargs.get("eval_dataset"))
        given = (row_count(kwargs.get("train_dataset")), row_count(kwargs.get("eval_dataset")))
        data = {"the training data": kwargs.get("train_dataset"), "the held-out data": kwargs.get("eval_dataset")}
        with template_rows.refused(kwargs.get("processing_class"), data):
            super().__init__(**kwargs)
        check_kept(self, given, "prompt + an answer is longer than that")
        # TRL casts a 4-bit model's trainable weights (LoRA and the score head) to bf16; back to fp32, as for sft/dpo.
        keep_trainable_fp32(self.model, self.args)
        # TRL's disable_dropout (on by default) zeroed LoRA's dropout too, while the config and card said --lora_dropout
        keep_lora_dropout(self.accelerator.unwrap_model(self.model))
        CheckpointBase.attach(self)
        self.loss, self.lm_loss_coef, self.lm_head = loss, lm_loss_coef, lm_head
        self._hidden = None
        if self.uses_lm_term:
            score = min(((n, m) for n, m in self.accelerator.unwrap_model(self.model).named_modules()
                         if n.split(".")[-1] == "score"), key=lambda nm: len(nm[0]))[1]
            score.register_forward_hook(self._catch_hidden)
        self._balance, self._router_logits = _router_balance(self.accelerator.unwrap_model(self.model)), None

    @property
    def uses_lm_term(self) -> bool:
        return self.loss == "logexpwithlm" and bool(self.lm_loss_coef) and self.lm_head is not None

    def _catch_hidden(self, module, inputs, output):
        self._hidden = inputs[0]

    def _catch_router_logits(self, module, inputs, output):
        self._router_logits = getattr(output, "router_logits", None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        margin = inputs.pop("margin", None)
        router = {"output_router_logits": True} if self._balance is not None else {}
        # The backbone's router logits, which the score head's output drops: caught for this forward only.
        caught = self._balance.backbone.register_forward_hook(self._catch_router_logits) if router else None
        try:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                            **router)
        finally:
            if caught is not None:
                caught.remove()
        chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)
        lm_loss = None
        if self.uses_lm_term:
            half = chosen.shape[0]
            hidden = self._hidden[:half]
            self._hidden = None
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
            labels = inputs["input_ids"][:half].masked_fill(inputs["attention_mask"][:half] == 0, -100)
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss = reward_loss(chosen, rejected, self.loss, margin, lm_loss, self.lm_loss_coef,
                           self.args.center_rewards_coefficient)
        aux_loss = None
        if self._balance is not None and self._router_logits is not None:  # MoE: load balancing, as sft/dpo/kto add it
            aux_loss = self._balance(self._router_logits, inputs["attention_mask"])
            self._router_logits = None
            loss = loss + self._balance.coef * aux_loss.to(loss.device)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():  # TRL's metric names, and the chosen/rejected means beside them
            gather = self.accelerator.gather_for_metrics
            c, r = gather(chosen.detach()), gather(rejected.detach())
            metrics = self._metrics[mode]
            # One entry per pair, not per batch: TRL's log averages the entries, and a mean of batch means counted a
            # short last batch's pairs over (73 held-out pairs in batches of 8: eval_accuracy 0.5375 for 36 of 73).
            metrics["accuracy"].extend((c > r).float().tolist())
            metrics["margin"].extend((c - r).tolist())
            metrics["rewards/chosen"].extend(c.tolist())
            metrics["rewards/rejected"].extend(r.tolist())
            metrics["mean_reward"].extend(torch.cat([c, r]).tolist())
            if lm_loss is not None:
                metrics["lm_loss"].append(gather(lm_loss.detach()).mean().item())
            if aux_loss is not None:
                metrics["aux_loss"].append(gather(aux_loss.detach().float()).mean().item())
        return (loss, outputs) if return_outputs else loss


@dataclasses.dataclass
class _Balance:
    """A mixture of experts' load-balancing loss (transformers' load_balancing_loss_func of its family), weighted by
    its config's router_aux_loss_coef: what its causal LM adds to the loss, and TRL's SFT/DPO/KTO trainers with it."""
    backbone: torch.nn.Module  # the model under the score head, whose output holds the router logits
    function: object
    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits, attention_mask):
        return self.function(router_logits, self.num_experts, self.top_k, attention_mask)


def _router_balance(model) -> _Balance | None:
    """The load-balancing loss of a reward model over a mixture of experts, as TRL's DPOTrainer decides it (a config
    with router logits to give, and a non-zero router_aux_loss_coef), else None. transformers' sequence-classification
    head drops the router logits, so reward.py trained the router (LoRA targets it) with no balancing term, unsaid
    (found by an audit)."""
    import sys

    seq = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = seq.config.get_text_config() if hasattr(seq.config, "get_text_config") else seq.config
    coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    if not hasattr(config, "output_router_logits") or not coef:
        return None
    function = getattr(sys.modules.get(type(seq).__module__), "load_balancing_loss_func", None)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    backbone = getattr(seq, getattr(seq, "base_model_prefix", ""), None)
    if function is None or not experts or backbone is None:
        logger.info(f"reward.py: {type(seq).__name__}'s load-balancing loss is not added (transformers has no "
                    "load_balancing_loss_func for it here): its router trains on the reward loss alone")
        return None
    logger.info(f"reward.py: {type(seq).__name__}'s load-balancing loss is added (router_aux_loss_coef {coef:g}, "
                "as dpo.py adds it)")
    return _Balance(backbone, function, experts, getattr(config, "num_experts_per_tok", 2), float(coef))


# ---------------------------------------------------------------------------------------------------------
# Held-out report


def scores_held_out(is_main_process: bool) -> bool:
    """Whether this process takes part in the held-out report: the main one, and under FSDP/ZeRO-3 every one."""
    from alignkit.core.launch import sharded_launch

    return is_main_process or sharded_launch() is not None


def _reshard(model) -> None:
    """FSDP2 leaves the root module's weights gathered after a forward pass without gradients; sharded again, the
    state dict that saves the adapter afterwards (training.gathered_state_dict) reads the shards it expects."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _numbered(dataset):
    """`dataset` (held-out pairs) with each row's number in it, in ROW: TRL's RewardTrainer keeps the column through
    its tokenizing and max_length filter (its collator reads only the ids and margins), so the rows it kept name
    their pairs."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or ROW in dataset.column_names:
        return dataset
    return dataset.add_column(ROW, list(range(len(dataset))))


def kept_by_trl(pairs, tokenizer, max_length: int | None, trainer=None):
    """The held-out pairs TRL's RewardTrainer keeps at `max_length`, as it tokenized them (chosen_ids, rejected_ids)
    with their row numbers in `pairs` (ROW): the trainer's own held-out data where it held out these very pairs
    (the same dataset's fingerprint) and trained at that length, else TRL's preparation of them run here, but not
    under DDP (TRL's preparation waits at barriers that a DDP launch's other ranks, which score nothing, never reach;
    under FSDP or ZeRO-3 every rank reports). TRL's filter and tokenization are the only ones: the report's pairs
    and tokens are TRL's (they were derived again here, every pair tokenized twice)."""
    from types import SimpleNamespace

    from accelerate import PartialState

    from alignkit.core.args import ConfigError

    prepared = getattr(trainer, "eval_dataset", None)
    same = getattr(pairs, "_fingerprint", None) is not None and \
        getattr(trainer, "held_out_fingerprint", None) == pairs._fingerprint
    if same and getattr(getattr(trainer, "args", None), "max_length", None) == max_length and \
            ROW in (getattr(prepared, "column_names", None) or ()):
        return prepared
    # TRL's preparation waits at barriers for every rank: refused where the other ranks do not score (DDP)
    if PartialState().num_processes > 1 and not scores_held_out(is_main_process=False):
        raise ConfigError("the held-out report under a DDP launch scores the pairs its trainer held out, at the "
                          "length it trained at: pass trainer= the RewardTrainer given these pairs")
    args = SimpleNamespace(max_length=max_length, dataset_num_proc=None)  # all that its preparation reads
    return RewardTrainer._prepare_dataset(None, _numbered(pairs), tokenizer, args, "eval")


def held_out_report(model, tokenizer, pairs, folder: Path, batch_size: int = 16, max_length: int | None = None,
                    write: bool = True, settings=None, trainer=None) -> dict:
    """Score the held-out pairs TRL's RewardTrainer kept; accuracy, means and standard deviations, and (`write`) a
    histogram PNG and the scores in `folder`. TRL drops a pair whose prompt + an answer is longer than `max_length`
    (its eval_accuracy is over the rest): such a pair is left out here too, counted in `held_out_left_out` (its row
    in `left_out` of held_out_rewards.json, whose `rows` name each scored pair's row; each scored pair with its
    rewards in held_out_pairs.jsonl); it was scored cut to `max_length`, a report over other pairs than
    eval_accuracy's (found by an audit). The pairs and their tokens are TRL's (`kept_by_trl`: the trainer's held-out
    data where `trainer` trained at `max_length`). `settings`: refused, as the saving would be, where the run trained
    with others (a notebook's settings cell run again before the saving cell) before anything is written; `trainer`:
    refused where it trained another folder (a notebook's earlier run's, left by a refused training cell).

    Under FSDP or ZeRO-3 a forward pass is a collective (each layer gathers its weights from every rank): every
    rank must call this with the trained, wrapped model (`trainer.model`), and only the main process writes.
    """
    from alignkit.core.args import ConfigError
    from alignkit.feedback.rewards import score_ids
    from alignkit.train.cell_checks import check_trainer_folder
    from alignkit.train.run_folder import check_trained

    check_trainer_folder(trainer, folder)
    check_trained(folder, settings)  # a training stopped in this process: its half-trained model is no report
    kept = kept_by_trl(pairs, tokenizer, max_length, trainer)
    rows = list(kept[ROW])
    left_out = sorted(set(range(len(pairs))) - set(rows))
    if not rows:
        raise ConfigError(f"--max_length {max_length}: prompt + an answer is longer than that in every one of the "
                          f"{len(left_out)} held-out pairs, so TRL drops them all; raise --max_length")
    model.eval()
    chosen = score_ids(model, tokenizer.pad_token_id, list(kept["chosen_ids"]), batch_size)
    rejected = score_ids(model, tokenizer.pad_token_id, list(kept["rejected_ids"]), batch_size)
    _reshard(model)
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    report = {
        "held_out_pairs": len(chosen), "held_out_left_out": len(left_out),
        "held_out_accuracy": (c > r).float().mean().item(),
        "chosen_mean": c.mean().item(), "chosen_std": c.std().item() if len(c) > 1 else 0.0,
        "rejected_mean": r.mean().item(), "rejected_std": r.std().item() if len(r) > 1 else 0.0,
        "margin_mean": (c - r).mean().item(), "margin_std": (c - r).std().item() if len(c) > 1 else 0.0,
    }
    report["histogram"] = str(Path(folder) / "rewards_histogram.png")
    if not write:
        return report
    histogram(chosen, rejected, Path(report["histogram"]))
    # Each score's pair: its row in the held-out pairs, and the pair itself in held_out_pairs.jsonl (the held-out
    # split is written nowhere else, so the scores joined back to nothing).
    (Path(folder) / "held_out_rewards.json").write_text(json.dumps({**report, "chosen": chosen, "rejected": rejected,
                                                                    "rows": rows, "left_out": left_out}))
    columns = [c for c in ("prompt", "chosen", "rejected", "margin") if c in pairs.column_names]
    with open(Path(folder) / "held_out_pairs.jsonl", "w") as f:
        for n, c_reward, r_reward in zip(rows, chosen, rejected):
            pair = pairs[n]
            f.write(json.dumps({"row": n, "chosen_reward": c_reward, "rejected_reward": r_reward,
                                **{c: pair[c] for c in columns}}, default=str) + "\n")
    logger.info(f"held-out rewards ({held_out_pairs(report, max_length)}): chosen {report['chosen_mean']:.3f} ± "
                f"{report['chosen_std']:.3f}, rejected {report['rejected_mean']:.3f} ± {report['rejected_std']:.3f}, "
                f"histogram {report['histogram']}")
    return report


def held_out_pairs(report: dict, max_length: int | None) -> str:
    """The pairs a held-out report scored, and those it left out and why: "116 pairs; 43 of 159 left out, ..."."""
    kept, left = report["held_out_pairs"], report.get("held_out_left_out", 0)
    return f"{kept} pairs" + (f"; {left} of {kept + left} left out: prompt + an answer is longer than --max_length "
                              f"{max_length}, and TRL's RewardTrainer dropped them" if left else "")


def histogram(chosen: list[float], rejected: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    low, high = min(chosen + rejected), max(chosen + rejected)
    bins = torch.linspace(low, high if high > low else low + 1, 31).tolist()
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {sum(chosen) / len(chosen):.2f})", color="tab:green")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {sum(rejected) / len(rejected):.2f})",
            color="tab:red")
    ax.set_xlabel("reward")
    ax.set_ylabel("held-out answers")
    ax.set_title("Held-out rewards: chosen vs rejected")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
