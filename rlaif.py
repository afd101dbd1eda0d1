# %% [markdown]
# # RLAIF: iterative (online) DPO on the policy's own samples
#
# Offline DPO trains on a fixed preference file; here each round's preferences come from the current policy:
# sample answers (label.py), judge every pair with an AI judge or a rule (label.py, cached), train DPO on them
# on top of the current policy (dpo.py; the reference is the previous round's policy), and judge the new policy
# against the previous one (evaluate.py pairwise). The question the RLAIF critique asks, whether labels on the
# policy's own samples beat fixed data, is answered by the win-rate curve.
#
# ```bash
# python sft.py --preset tiny && python rlaif.py --preset tiny --model_id runs/tiny-sft --rounds 3   # offline demo
# python rlaif.py --model_id runs/sft-mistral --dataset_id prompts.jsonl --max_prompts 2000 --num_samples 4 \
#     --judge_base_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct --rounds 3
# python rlaif.py --help                                          # every setting, its default and env var
# ```

# %% [markdown]
# ## Settings
# Defaults < `--preset` < `.env` < environment < `--config recipe.yaml` < flags < `overrides`. The DPO settings
# apply to every round's dpo.py run; `--label_args` and `--evaluate_args` pass anything else on. What round 1's
# label.py, dpo.py and evaluate.py would refuse is refused here: their flags, the model, the prompts, the judge.

# %%
from alignkit.core.errors import report_user_errors

report_user_errors()  # a bad flag, file or data row: `error: ...`, exit status 2 (--debug shows the traceback)

from alignkit.core.args import parse_config
from alignkit.core.config import RLAIFSettings
from alignkit.core.launch import establish_launch
from alignkit.modeling import presets

# In a notebook, set things here instead of on a command line, e.g.
# overrides = {"preset": "tiny", "model_id": "runs/tiny-sft", "rounds": 2} (after sft.py's tiny run, as on the README).
overrides: dict = {}

settings = parse_config(
    RLAIFSettings, overrides=overrides, presets={"tiny": presets.defaults("rlaif")}, prog="rlaif.py",
    description="Iterative DPO: sample, judge, train, evaluate, round after round.",
)
launch = establish_launch(settings, "rlaif.py")  # the process's device, the process group, what this launch refuses
presets.ensure(settings)  # after the launch's refusal: rlaif.py runs as one process, refused before the preset builds

from alignkit.train.rlaif import check

check(settings)  # round 1's steps' flags, the model, the prompts' column, the judge: refused now, before any folder

# %% [markdown]
# ## Run folder
# `output_dir/run_name/round-N/` per round: preferences (+ label cache), the DPO adapter in `dpo/`, the
# evaluation in `eval/`, and `round.json` once the round is complete. A rerun reuses each step made from the same
# inputs and redoes the rest, naming what changed (alignkit.train.rlaif); earlier results move to `previous-TIME/`.

# %%
from alignkit.core.saved_settings import save_config
from alignkit.train.training import run_dir

folder = run_dir(settings, "rlaif")
folder.mkdir(parents=True, exist_ok=True)
save_config(settings, folder / "rlaif_config.json")  # secrets redacted

# %% [markdown]
# ## Rounds
# Each step is a script in its own process and resumes by its own rules; a failed step stops the loop with
# its log, and running it again resumes at that round.

# %%
from alignkit.train.rlaif import run

records = run(settings, folder)

# %% [markdown]
# ## Win rate per round
# Adjusted win rate (win + 0.5 tie) / n of each round's policy against the previous round's, with a bootstrap
# 95% CI: `rlaif.md` and `win_rate.png`. The last round's adapter is the result; merge.py and evaluate.py
# take it like any DPO adapter.

# %%
from alignkit.train.rlaif import format_table

print(format_table(records))
print(f"\ntable: {folder / 'rlaif.md'}\nchart: {folder / 'win_rate.png'}\nfinal adapter: {records[-1]['policy']}")

from alignkit.train.report import show

show(folder / "win_rate.png")  # in a notebook: the win rate per round below this cell
