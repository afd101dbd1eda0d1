# %% [markdown]
# # Merge: adapters into the base model, checked, saved, published
#
# Loads the base in full precision (merging into 4-bit weights would round the adapter's update away),
# applies the adapter chain (an SFT adapter, then a DPO adapter on top, merge in order), merges, and checks
# on a few prompts that the merged model's logits equal base + adapters before saving anything. For a QLoRA
# adapter, `--dequantize` merges into the dequantized 4-bit base instead (NF4, or the run's fp4): exactly the model
# that was trained; a reward model trained with QLoRA merges so by default (its scores are the product).
# A LoTA run folder (a sparse delta, alignkit.train.lota) merges the same way; `--add_delta` instead adds two LoTA
# deltas of one base into a single delta (a task merge) and reports how many entries they share.
#
# ```bash
# python merge.py --preset tiny                                    # merges runs/tiny-dpo: the SFT -> DPO chain
# # of `dpo.py --preset tiny --model_id runs/tiny-sft` (after `dpo.py --preset tiny` alone: one adapter)
# python merge.py --adapter_dir runs/tiny-dpo/checkpoint-20        # into runs/tiny-dpo/merged-checkpoint-20
# python merge.py --adapter_dir runs/my-dpo --output_dir my-model --dtype bf16
# python merge.py --adapter_dir runs/my-qlora-dpo --dequantize     # match the 4-bit base it was trained on
# python merge.py --adapter_dir runs/my-dpo --push_to_hub --hub_repo_id you/my-model         # private
# python merge.py --adapter_dir runs/my-dpo --push_to_hub --push adapter --hub_repo_id you/my-adapter
# python merge.py --adapter_dir runs/lota-a --add_delta runs/lota-b --output_dir runs/lota-ab   # LoTA task merge
# ```

# %% [markdown]
# ## Settings
# The same mechanism as every script: flags, environment variables, `.env`, `--config`, `--preset`.
# A push needs HF_TOKEN: checked here, before the merge.

# %%
from pathlib import Path

from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import MergeSettings
from alignkit.modeling import presets

# In a notebook, set things here instead of on a command line, e.g. overrides = {"preset": "tiny", "dtype": "fp32"};
# environment variables (ALIGNKIT_<NAME>, e.g. ALIGNKIT_MAX_STEPS=20) work too. Flags on a command line apply as well.
overrides: dict = {}

settings = parse_config(
    MergeSettings, overrides=overrides, prog="merge.py",
    presets={"tiny": {"adapter_dir": "runs/tiny-dpo"}, "smol": {"adapter_dir": "runs/smol-dpo"}},
    description="Merge LoRA adapters into their base model, check, save and push.",
)
from alignkit.core.launch import establish_launch

establish_launch(settings, "merge.py")  # the process's device, the process group, what this launch refuses
presets.ensure(settings)  # after the launch's refusal: merge.py runs as one process, refused before the preset builds
from alignkit.modeling.model_folders import check_run_finished

for flag, folder in (("--adapter_dir", settings.adapter_dir), ("--add_delta", settings.add_delta)):
    if folder and Path(folder).is_dir():  # a run not finished, a checkpoint cut off: said now, naming the one to use
        check_run_finished(folder, flag)
if settings.push_to_hub:
    from alignkit.core.hub import check_pushable, require_token

    if settings.push == "adapter":
        check_pushable(settings.adapter_dir)  # an adapter on a local base loads nowhere else: refused now
    require_token()  # a token, and a Hub that answers
from alignkit.core.run_records import merge_folder

# Its merged/, or for a checkpoint-N the run folder's merged-checkpoint-N/: a resumed run deletes old checkpoints whole.
output_dir = Path(settings.output_dir or merge_folder(settings.adapter_dir))

# %% [markdown]
# ## Merge and check
# Fails loudly, saving nothing, when the merged logits differ from base + adapters beyond the tolerance. With
# `--add_delta`, two LoTA deltas over one base are added into one (a task merge; the entries both touch are
# counted) instead.

# %%
from alignkit.modeling.merge import merge_adapters
from alignkit.modeling import lota_delta
from alignkit.modeling.chain import resolve
from alignkit.modeling.lineage import check_trained_over

if settings.add_delta:
    for delta in (settings.adapter_dir, settings.add_delta):  # a part below retrained in place: refused
        check_trained_over(resolve(delta))
    report = lota_delta.add_deltas(settings.adapter_dir, settings.add_delta, output_dir)
    print(f"summed delta: {output_dir} ({report['entries']:,} entries, {report['overlap']:,} touched by both)")
elif settings.push != "adapter" or not settings.push_to_hub:
    merged_dir = merge_adapters(
        settings.adapter_dir, output_dir, dtype=settings.dtype, base_model=settings.base_model,
        dequantize={"auto": None, "true": True, "false": False}[settings.dequantize],
        max_shard_size=settings.max_shard_size,
        trust_remote_code=settings.trust_remote_code,
    )
    print(f"merged model: {merged_dir}")

# %% [markdown]
# ## Publish
# A model card (base, data, settings without secrets, final metrics, evaluation results, how to load it)
# goes with the weights and the tokenizer. Private unless `--hub_public`.

# %%
from alignkit.core.hub import push
from alignkit.core.run_records import repo_name

if settings.push_to_hub:
    folder = output_dir if settings.push == "merged" else Path(settings.adapter_dir)
    if settings.push == "adapter":  # a checkpoint-N: its figures (a reward model's rows' format) in metrics.json
        from alignkit.modeling.merge import keep_checkpoint_metrics

        keep_checkpoint_metrics(folder, folder)
    name = repo_name(settings.adapter_dir)  # without --hub_repo_id, the repo is named after the run (and step)
    url = push(folder, settings.hub_repo_id, private=not settings.hub_public, name=name)
    print(f"pushed: {url}")
