"""Bad input to any of the nine scripts: one `error:` line that names it and the fix, exit status 2, no traceback.

Each case runs the script in this process (conftest.run_script) and, when it raises, hands the exception to
`sys.excepthook` as the interpreter does at the top level: a script that never called `report_user_errors()`,
or an error that is no UserError, prints Python's traceback there and fails the case. Almost every case stops in
argument parsing or before the model loads, so the table costs seconds, not a run each.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from alignkit.core.errors import UserError
from conftest import run_script

ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}

# (script, arguments, what the error line must say, launch environment). In the arguments, "OUT" is the case's
# output folder; the bad files (missing.jsonl, empty.jsonl, ...) sit in the working folder (see `bad_files`).
TRAIN = ["--preset", "tiny", "--output_dir", "OUT"]
CASES = [
    ("dpo.py", [*TRAIN, "--dpo_betta", "0.1"],
     "unknown setting: --dpo_betta (on the command line; did you mean --dpo_beta?)", None),
    ("dpo.py", [*TRAIN, "--dpo_beta", "-1"], "dpo_beta must be > 0", None),
    ("merge.py", ["--adapter_dir", "x", "--push_to_hub", "--hub_repo_id", "me/x"], "HF_HUB_OFFLINE=1 is set", None),
    # A --trainer_overrides key no TRL config has: refused before the data and model load (it was after), naming
    # alignkit's own flag where it is one.
    ("dpo.py", [*TRAIN, "--trainer_overrides", '{"eval_split": 0.2}'],
     "--trainer_overrides eval_split: not field(s) of TRL's DPOConfig, which this run uses; drop them (--eval_split "
     "is alignkit's own setting: pass it as a flag)", None),
    # The other algorithm's TRL field: refused with the settings (it was, once the model had loaded).
    ("rl.py", [*TRAIN, "--algo", "rloo", "--importance_sampling_level", "sequence"],
     "importance_sampling_level: not field(s) of TRL's RLOOConfig, which --algo rloo uses", None),
    # A local base without --merge_adaptors: that refusal first (going online would not help).
    ("dpo.py", [*TRAIN, "--push_to_hub"], "is local: nobody else could load it", {"HF_TOKEN": "hf_fake_token_0123"}),
    # A token but no Hub (offline, as the tests run): refused before training, not in create_repo's traceback after.
    ("dpo.py", [*TRAIN, "--push_to_hub", "--merge_adaptors"], "pushing to the Hub needs the Hub, and HF_HUB_OFFLINE=1 "
     "is set", {"HF_TOKEN": "hf_fake_token_0123456789"}),
    ("sft.py", [*TRAIN, "--nosuch", "1"], "unknown setting: --nosuch", None),
    ("sft.py", [*TRAIN, "--learning_rate", "abc"], "invalid value for --learning_rate", None),
    ("sft.py", [*TRAIN, "--max_steps", "-5"], "--max_steps must be a number of steps", None),
    ("sft.py", [*TRAIN, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1", None),
    ("sft.py", [*TRAIN, "--dataset_id", "missing.jsonl"], "missing.jsonl: file not found", None),
    ("dpo.py", [*TRAIN, "--dataset_config", "en"], "--dataset_config en: ", None),  # the preset's single file
    ("sft.py", [*TRAIN, "--dataset_id", "empty.jsonl"], "empty.jsonl: no usable rows", None),
    ("sft.py", [*TRAIN, "--model_id", "some-folder"], "some-folder is not a model folder", None),
    ("sft.py", [*TRAIN, "--config", "missing.yaml"], "config file not found: missing.yaml", None),
    ("sft.py", [*TRAIN, "--adapter", "lota", "--lota_sparsity", "1.5"], "lota_sparsity must lie strictly between 0 and 1", None),
    ("sft.py", [*TRAIN, "--adapter", "lota"], "--adapter lota under FSDP is not supported", FSDP),
    ("dpo.py", TRAIN, "FSDP1 (fsdp_version 1, accelerate's default when the config names none) is not supported",
     {**FSDP, "FSDP_VERSION": "1"}),
    ("dpo.py", [*TRAIN, "--model_id", "some-folder"], "some-folder is not a model folder", None),
    ("dpo.py", [*TRAIN, "--model_id", "truncated"], "truncated/model.safetensors is damaged", None),
    ("dpo.py", [*TRAIN, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1", None),
    ("dpo.py", [*TRAIN, "--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1", None),
    ("dpo.py", [*TRAIN, "--max_steps", "-5"], "--max_steps must be a number of steps", None),
    ("dpo.py", [*TRAIN, "--dataset_id", "bad-json.jsonl"], "bad-json.jsonl: line 2: invalid JSON", None),
    ("dpo.py", [*TRAIN, "--dataset_id", "bad-row.jsonl"], "bad-row.jsonl: row 2: field 'rejected'", None),
    ("dpo.py", [*TRAIN, "--eval_split", "-1"], "--eval_split must be a share below 1, a whole number of rows, or 0",
     None),
    ("dpo.py", [*TRAIN, "--eval_split", "nan"], "--eval_split must be a share below 1, a whole number of rows, or 0",
     None),
    ("sft.py", [*TRAIN, "--eval_split", "1.5"], "--eval_split must be a share below 1, a whole number of rows, or 0 "
     "(none held out); got 1.5", None),  # held out as 1 row without a word (the notebook audit)
    ("dpo.py", [*TRAIN, "--loss_type", "sigmod"], "unknown --loss_type sigmod: did you mean sigmoid?", None),
    ("sft.py", [*TRAIN, "--seed", "-1"], "--seed must be a whole number from 0 to 4294967295, got -1", None),
    ("sft.py", [*TRAIN, "--max_samples", "0"], "--max_samples must be at least 1", None),
    ("sft.py", [*TRAIN, "--learning_rate", "-1e-4"], "--learning_rate must be >= 0", None),
    ("sft.py", [*TRAIN, "--warmup_ratio", "5"], "--warmup_ratio must be a share of the steps", None),
    ("sft.py", [*TRAIN, "--num_train_epochs", "nan"], "--num_train_epochs must be a number", None),
    ("sft.py", [*TRAIN, "--lora_dropout", "1.5"], "--lora_dropout must be from 0 up to (not including) 1", None),
    ("sft.py", [*TRAIN, "--lr_scheduler_type", "cosin"], "invalid value for --lr_scheduler_type: 'cosin' is not one of", None),
    ("dpo.py", [*TRAIN, "--trainer_overrides", '{"optim": "adamw_torch_fusd"}'],
     "invalid value for --trainer_overrides optim: 'adamw_torch_fusd' is not one of", None),
    ("sft.py", [*TRAIN, "--trainer_overrides", '{"optim": 5}'],
     "invalid value for --trainer_overrides optim: 5 is not OptimizerNames or str", None),
    ("sft.py", [*TRAIN, "--config", "latin1.yaml"], "latin1.yaml: line 2: not UTF-8 text; save the file as UTF-8", None),
    ("sft.py", [*TRAIN, "--config", "tab.yaml"],
     "tab.yaml: line 2, column 10: not valid YAML (found character '\\t' that cannot start any token); fix the file", None),
    ("evaluate.py", ["vibes", "--model_id", "some-folder", "--prompts", "hi", "--seed", "-3"], "--seed must be", None),
    ("reward.py", [*TRAIN, "--dataset_id", "margin-null.jsonl", "--use_margin"],
     "margin-null.jsonl: row 2: field 'margin': expected a number (--use_margin reads it), got None", None),
    ("dpo.py", [*TRAIN, "--adapter", "lota"], "--adapter lota under DeepSpeed ZeRO-3 is not supported", ZERO3),
    # A loss mask the rows cannot have, before the model loads: it trained every token without a word (plain text),
    # or stopped in TRL's traceback once the model had loaded (assistant_only_loss, padding_free).
    ("sft.py", [*TRAIN, "--dataset_id", "text.jsonl", "--train_on", "completions"],
     "--train_on completions: text.jsonl holds plain text, with no completion apart from its prompt", None),
    ("sft.py", [*TRAIN, "--dataset_id", "text.jsonl", "--completion_only_loss", "true"],
     "--completion_only_loss true: text.jsonl holds plain text, with no completion apart from its prompt; give "
     "prompt/completion rows or messages, or drop --completion_only_loss true", None),  # not --train_on all's fix
    # A chat template without {% generation %} markers (the handbook's zephyr template): TRL's "not
    # training-compatible" traceback once the model had loaded.
    ("sft.py", [*TRAIN, "--assistant_only_loss", "true", "--chat_template", "zephyr.jinja"],
     "--assistant_only_loss true: the chat template --chat_template zephyr.jinja has no {% generation %} markers "
     "around the assistant turns", None),
    ("sft.py", [*TRAIN, "--train_on", "completions", "--chat_template", "zephyr.jinja"],
     "--train_on completions: the chat template --chat_template zephyr.jinja has no {% generation %} markers", None),
    # TRL's end tokens outside the vocabulary: its traceback once the model had loaded.
    ("sft.py", [*TRAIN, "--eos_token", "<|im_end|>"], "--eos_token <|im_end|>: not a token of ", None),
    ("sft.py", [*TRAIN, "--pad_token", "<|im_end|>"], "--pad_token <|im_end|>: not a token of ", None),
    # TRL's eos_token/pad_token in the other scripts that take them: TRL's ValueError once the model had loaded
    ("reward.py", [*TRAIN, "--eos_token", "NOPE"], "--eos_token NOPE: not a token of ", None),
    ("reward.py", [*TRAIN, "--pad_token", "NOPE"], "--pad_token NOPE: not a token of ", None),
    ("dpo.py", [*TRAIN, "--pad_token", "NOPE"], "--pad_token NOPE: not a token of ", None),
    ("rlaif.py", [*TRAIN, "--pad_token", "NOPE"], "--pad_token NOPE: not a token of ", None),
    ("sft.py", [*TRAIN, "--dataset_id", "pc.jsonl", "--assistant_only_loss", "true"],
     "--assistant_only_loss true needs conversations (messages): pc.jsonl holds prompt/completion text", None),
    # A negative NEFTune scale: torch's uniform_ refused it at the first training step.
    ("sft.py", [*TRAIN, "--neftune_noise_alpha", "-3"], "--neftune_noise_alpha must be >= 0", None),
    ("sft.py", [*TRAIN, "--padding_free", "true"], "--padding_free true without --packing: TRL cannot cut rows to "
     "--max_length then", None),
    # TRL's implicit prompt (two texts sharing their start): the answer that is missing, named (it said 'chosen'
    # was empty text where the two were the same).
    ("dpo.py", [*TRAIN, "--dataset_id", "implicit-same.jsonl"],
     "implicit-same.jsonl: row 2: field 'rejected': expected an answer different from 'chosen', got the same text", None),
    ("reward.py", [*TRAIN, "--dataset_id", "implicit-prefix.jsonl"],
     "implicit-prefix.jsonl: row 2: field 'rejected': expected an answer after the prompt both texts begin with", None),
    # Every row dropped by TRL for --max_length: kto.py trained no step and saved an untrained adapter, status 0.
    ("kto.py", [*TRAIN, "--dataset_id", "kto-long.jsonl", "--max_length", "48", "--eval_split", "0"],
     "--max_length 48: the prompt alone is at least that many tokens in every one of the 8 training rows", None),
    ("label.py", ["--preset", "tiny", "--output", "OUT/x.jsonl", "--judge", "nosuch"], "--judge 'nosuch'", None),
    ("label.py", ["--preset", "tiny", "--output", "OUT/x.jsonl", "--prompts", "missing.jsonl"],
     "missing.jsonl: file not found", None),
    ("label.py", ["--preset", "tiny", "--output", "OUT/x.jsonl", "--model_id", "some-folder"],
     "some-folder is not a model folder", None),
    ("label.py", ["--responses_a", "empty.jsonl", "--responses_b", "empty.jsonl", "--judge", "python:alignkit.modeling.presets:rule_judge",
                  "--output", "OUT/x.jsonl"], "empty.jsonl: no rows: it is empty", None),
    # Settings --mode completions never reads: ignored without a word (a label.py audit).
    ("label.py", ["--preset", "tiny", "--mode", "completions", "--output", "OUT/x.jsonl", "--judge", "rm:nowhere"],
     "--judge rm:nowhere judges --mode pairs and grades --mode pointwise; --mode completions asks no judge: drop it",
     None),
    ("label.py", ["--preset", "tiny", "--mode", "completions", "--output", "OUT/x.jsonl", "--grade_threshold", "5"],
     "--grade_threshold 5.0 applies to --mode pointwise's grades; --mode completions does not grade: drop it, or "
     "pass --mode pointwise", None),
    ("evaluate.py", ["nosuch"], "unknown command 'nosuch'", None),
    # A reward model as an LLM judge: taken for a model name at the endpoint ("OPENAI_API_KEY is not set"), in
    # every script with --judge_model (the judges' shared settings group refuses it).
    *[(script, [*args, "--judge_model", "rm:runs/tiny-reward"],
       "--judge_model rm:runs/tiny-reward: --judge_model names an LLM judge (evaluate.py pairwise also takes rule or "
       "python:module:function); a reward model judges through --judge rm:FOLDER (label.py, rlaif.py) and rewards "
       "through --reward rm:FOLDER (rl.py)", None)
      for script, args in (("evaluate.py", ["pairwise", "--preset", "tiny"]),
                           ("evaluate.py", ["alpaca_eval", "--preset", "tiny"]),
                           ("rl.py", [*TRAIN, "--reward", "judge"]),
                           ("label.py", ["--preset", "tiny", "--output", "OUT/x.jsonl"]),
                           ("rlaif.py", TRAIN))],
    ("rlaif.py", [*TRAIN, "--eval_judge_model", "rm:runs/tiny-reward"],
     "--eval_judge_model rm:runs/tiny-reward: evaluate.py pairwise judges by an LLM (--eval_judge_model NAME), rule or "
     "python:module:function; a reward model judges the pairs through --judge rm:FOLDER", None),
    # A mistyped folder to reuse answers from reused nothing, without a word (audit).
    ("evaluate.py", ["pairwise", "--preset", "tiny", "--answers_from", "nowhere"],
     "--answers_from nowhere: no such folder; pass an earlier evaluation's --output_dir", None),
    ("evaluate.py", ["vibes", "--model_id", "some-folder", "--prompts", "hi"], "some-folder is not a model folder", None),
    ("evaluate.py", ["vibes", "--model_id", "truncated", "--prompts", "hi"], "model.safetensors is damaged", None),
    ("evaluate.py", ["vibes", "--model_id", "./no-such-folder", "--prompts", "hi"], "model not found", None),
    ("evaluate.py", ["vibes", "--model_id", "gguf-folder", "--gguf_file", "nosuch.gguf", "--prompts", "hi"],
     "--gguf_file nosuch.gguf: no such file in gguf-folder", None),
    ("dpo.py", [*TRAIN, "--model_id", "gguf-folder", "--gguf_file", "nosuch.gguf"],
     "--gguf_file nosuch.gguf: no such file in gguf-folder", None),
    ("merge.py", ["--adapter_dir", "./no-such-folder"], "model not found", None),
    ("merge.py", ["--adapter_dir", "some-folder"], "some-folder is not a model folder", None),
    ("merge.py", ["--adapter_dir", "torn-adapter"], "torn-adapter/adapter_config.json is not valid JSON", None),
    ("evaluate.py", ["vibes", "--model_id", "torn-adapter", "--prompts", "hi"], "adapter_config.json is not valid JSON",
     None),
    ("merge.py", ["--adapter_dir", "truncated"], "truncated/model.safetensors is damaged", None),
    # PEFT's size-mismatch error: a traceback of dozens of lines (the merge.py audit of session 30).
    ("merge.py", ["--adapter_dir", "other-shape-adapter", "--output_dir", "OUT/m"],
     "other-shape-adapter does not fit ", None),
    ("merge.py", ["--adapter_dir", "truncated", "--nosuch", "1"], "unknown setting: --nosuch", None),
    # A token as a flag: "unknown setting" in the scripts without TRL's names, where the training scripts say why.
    *((script, [*args, "--hub_token", "hf_x"], "--hub_token has no effect in alignkit: a token in a flag or a recipe "
       "is kept where it should not be (a training run saves it in every checkpoint's training_args.bin, a shell in "
       "its history); set HF_TOKEN", None)
      for script, args in (("merge.py", ["--adapter_dir", "truncated"]), ("rl.py", TRAIN),
                           ("label.py", ["--preset", "tiny", "--output", "OUT/x.jsonl"]),
                           ("evaluate.py", ["vibes", "--preset", "tiny"]))),
    ("reward.py", [*TRAIN, "--dataset_id", "empty.jsonl"], "empty.jsonl: no usable rows", None),
    ("reward.py", [*TRAIN, "--loss", "nosuch"], "invalid value for --loss", None),
    ("reward.py", [*TRAIN, "--model_id", "truncated"], "truncated/model.safetensors is damaged", None),
    ("reward.py", [*TRAIN, "--max_steps", "-5"], "--max_steps must be a number of steps", None),
    ("rl.py", [*TRAIN, "--reward", "nosuch"], "--reward 'nosuch'", None),
    ("rl.py", [*TRAIN, "--loss_type", "dapoo"], "unknown loss_type dapoo for GRPO: did you mean dapo?", None),
    ("rl.py", [*TRAIN, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1", None),
    ("rl.py", [*TRAIN, "--dataset_id", "missing.jsonl"], "missing.jsonl: file not found", None),
    ("rl.py", [*TRAIN, "--model_id", "some-folder"], "some-folder is not a model folder", None),
    # TRL's counts of a generation's batches and passes at 0: no batch sampled, 0 steps trained, an untrained
    # adapter saved with exit status 0.
    ("rl.py", [*TRAIN, "--num_iterations", "0"], "num_iterations must be >= 1", None),
    ("rl.py", [*TRAIN, "--steps_per_generation", "0"], "steps_per_generation must be >= 1", None),
    ("rl.py", [*TRAIN, "--generation_batch_size", "0"], "generation_batch_size must be >= 1", None),
    # "beta must be >= 0 and max_completion_length >= 1": neither which one, nor the value given.
    ("rl.py", [*TRAIN, "--beta", "-1"], "--beta must be >= 0 (the KL pull towards the reference; 0: none), got -1.0",
     None),
    ("rl.py", [*TRAIN, "--max_completion_length", "0"], "--max_completion_length must be at least 1 (tokens per "
     "sampled completion), got 0", None),
    # TRL's --use_vllm true on a CPU said "--backend vllm: no CUDA GPU", a flag never typed: named as given.
    ("rl.py", [*TRAIN, "--use_vllm", "true"], "--use_vllm true: no CUDA GPU; drop it (or set it false) to generate "
     "with transformers", None),
    ("rl.py", TRAIN, "env var ALIGNKIT_USE_VLLM (--backend vllm): no CUDA GPU", {"ALIGNKIT_USE_VLLM": "true"}),
    # A limit of 0 read as "no limit" (`if s.max_prompts and ...`): every prompt, and max_prompts 0 in the record.
    ("rl.py", [*TRAIN, "--max_prompts", "0"], "--max_prompts must be at least 1 (or none: all), got 0", None),
    ("label.py", ["--preset", "tiny", "--output", "OUT/x.jsonl", "--max_prompts", "0"],
     "--max_prompts must be at least 1 (or none: all), got 0", None),
    ("rlaif.py", [*TRAIN, "--max_prompts", "-1"], "--max_prompts must be at least 1 (or none: all), got -1", None),
    ("rlaif.py", [*TRAIN, "--eval_max_prompts", "0"], "--eval_max_prompts must be at least 1 (or none: all), got 0",
     None),
    # rl.py's own vLLM memory share on the transformers backend: dropped without a word, as its vllm_* siblings were not.
    # Greedy rollouts through TRL's generation_kwargs (over its own do_sample True): a group's completions all alike,
    # every advantage 0, as --temperature 0 (refused) would make them; a negative clip: no gradient for one sign.
    ("rl.py", [*TRAIN, "--generation_kwargs", '{"do_sample": false}'], "generation_kwargs do_sample false decodes "
     "greedily: every completion of a prompt is the same, so every advantage is 0", None),
    ("rl.py", [*TRAIN, "--epsilon_high", "-0.1"], "epsilon_high must be >= 0, got -0.1", None),
    # rl.py holds no data out: eval_steps said "Pass --eval_split 0.05 or --dataset_test_split test", both refused there.
    ("rl.py", [*TRAIN, "--eval_strategy", "steps", "--eval_steps", "1"], "rl.py holds no data out: it measures the "
     "reward on its own samples, logged every --logging_steps (training.png); drop eval_split / eval_strategy / "
     "eval_steps", None),
    ("rl.py", [*TRAIN, "--vllm_gpu_memory_utilization", "0.5"], "rl.py --vllm_gpu_memory_utilization: generation "
     "runs on transformers here (--backend auto; vLLM needs a CUDA GPU and the vllm package), so it would do nothing; "
     "drop it", None),
    ("rlaif.py", [*TRAIN, "--rounds", "0"], "rounds must be >= 1", None),
    ("rlaif.py", [*TRAIN, "--nosuch", "3"], "unknown setting: --nosuch", None),
    ("rlaif.py", [*TRAIN, "--max_steps", "-5"], "--max_steps must be a number of steps", None),
    ("rlaif.py", [*TRAIN, "--adapter", "lota", "--reference", "start", "--rounds", "2"],
     "--adapter lota with --reference start is not supported past round 1", None),
    ("sft.py", [*TRAIN, "--chat_template", "bad.jinja"],
     "--chat_template bad.jinja: line 1: not a valid Jinja template (unexpected '}'); fix the template", None),
    ("evaluate.py", ["vibes", "--preset", "tiny", "--chat_template", "latin1.jinja", "--prompts", "hi"],
     "--chat_template latin1.jinja: not UTF-8 text (byte 0xe9 at offset 3); save the file as UTF-8", None),
    ("merge.py", ["--adapter_dir", "bad-json.jsonl"],
     "bad-json.jsonl is a file, not a model: pass the folder that holds it (.), a .gguf file, or a Hub id", None),
    ("dpo.py", [*TRAIN, "--model_id", "some-folder/notes.txt"], "some-folder/notes.txt is a file, not a model", None),
    ("sft.py", [*TRAIN, "--lora_target_modules", "query_key_value"],
     "has no module named query_key_value; its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, "
     "up_proj, v_proj (or pass all-linear)", None),
    # Over an adapter, the base's layers by their own names (it listed "base_layer", PEFT's wrapper).
    ("dpo.py", [*TRAIN, "--model_id", "lora-adapter", "--lora_target_modules", "query_key_value"],
     "has no module named query_key_value; its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, "
     "up_proj, v_proj (or pass all-linear)", None),
    # A copy that left the weights out: transformers' OSError, PEFT's "Repo id must be in the form" for a local path.
    ("sft.py", [*TRAIN, "--model_id", "config-only"], "config-only holds a model's config.json but no weights", None),
    ("dpo.py", [*TRAIN, "--model_id", "adapter-without-weights"],
     "adapter-without-weights holds adapter_config.json but not the adapter's weights", None),
    # Runs go under --output_dir: a file there failed with a traceback as the run folder was claimed, after loading.
    ("sft.py", [*TRAIN[:2], "--output_dir", "bad-json.jsonl"],
     "--output_dir bad-json.jsonl: ", None),
    ("evaluate.py", ["pairwise", "--preset", "tiny", "--models", "sft=custom-code", "b=truncated", "--output_dir",
                     "bad-json.jsonl"], "--output_dir bad-json.jsonl: ", None),  # FileExistsError from its lock
    ("evaluate.py", ["vibes", "--preset", "tiny", "--prompts", "hi", "--output_file", "some-folder"],
     "--output_file some-folder is a folder: name a file", None),  # IsADirectoryError after every answer
    # One misspelt name beside a good one trained a tenth of the adapter, without a word.
    ("dpo.py", [*TRAIN, "--lora_target_modules", "q_proj,nosuch"], "has no module named nosuch;", None),
    # TRL drops what does not fit --max_length while it tokenizes: all of it was an IndexError when training began.
    ("dpo.py", [*TRAIN, "--max_length", "4"],
     "--max_length 4: the prompt alone is at least that many tokens in every one of the", None),
    # ... and SFT, whose rows TRL drops when the prompt leaves no answer token: a traceback, or rows gone silently
    ("sft.py", [*TRAIN, "--max_length", "4"],
     "--max_length 4: the prompt leaves no token of the answer to learn in every one of the", None),
    ("reward.py", [*TRAIN, "--max_length", "4"],
     "--max_length 4: prompt + an answer is longer than that in every one of the", None),
    # A chat template that refuses a row (raise_exception) failed inside TRL's dataset map, naming no row.
    ("sft.py", [*TRAIN, "--dataset_id", "system-sft.jsonl", "--chat_template", "no-system.jinja"],
     "the chat template refuses a row of the training data (the one whose first user turn is 'name three "
     "vegetables.'), messages: System role not supported. Drop or rewrite such rows", None),
    ("dpo.py", [*TRAIN, "--dataset_id", "system.jsonl", "--chat_template", "no-system.jinja", "--eval_split", "0"],
     "the chat template refuses a row of the training data (the one whose first user turn is 'name three "
     "vegetables.'), prompt: System role not", None),
    # ... also where TRL maps the rows in worker processes (the error arrives from a worker)
    ("dpo.py", [*TRAIN, "--dataset_id", "system.jsonl", "--chat_template", "no-system.jinja", "--eval_split", "0",
                "--dataset_num_proc", "2"],
     "the chat template refuses a row of the training data (the one whose first user turn is 'name three "
     "vegetables.'), prompt: System role not", None),
    ("rl.py", [*TRAIN, "--dataset_id", "system.jsonl", "--chat_template", "no-system.jinja",  # 2 prompts, 2 a step
               "--per_device_train_batch_size", "8", "--num_generations", "4"],
     "the chat template refuses a row of the prompts (the one whose first user turn is 'name three vegetables.')", None),
    # ... and generating for such a prompt (label.py, evaluate.py) was transformers' traceback too.
    ("label.py", ["--preset", "tiny", "--prompts", "system.jsonl", "--chat_template", "no-system.jinja", "--output",
                  "OUT/prefs.jsonl"],
     "the chat template refuses a prompt (the one whose first user turn is 'name three vegetables.'): System role", None),
    # A model that ships its own code, without --trust_remote_code: transformers' ValueError and its traceback.
    ("evaluate.py", ["vibes", "--model_id", "custom-code", "--prompts", "hi"],
     "custom-code ships its own model code, which runs only with --trust_remote_code", None),
    # A token in a flag or recipe is kept in every checkpoint's training_args.bin.
    ("sft.py", [*TRAIN, "--hub_token", "hf_FlagSecretToken9876543"], "--hub_token has no effect in alignkit", None),
    # What a round's own step would refuse (label.py's judge, in its own process) is refused before round 1 by
    # rlaif's settings check (a step's refusal said once: test_rlaif.py).
    ("rlaif.py", [*TRAIN, "--judge", "nosuch"], "--judge 'nosuch': expected openai, hf, rm:RUN_FOLDER", None),
]


@pytest.fixture(scope="module")
def bad_files(tiny_cache, tmp_path_factory):
    """A working folder holding the bad inputs: an empty data file, malformed JSON lines, a row without its
    rejected answer, a folder that holds no model, a folder of GGUF files, and a model whose weights file was cut
    in half."""
    from alignkit.modeling import presets

    here = tmp_path_factory.mktemp("bad-inputs")
    (here / "empty.jsonl").write_text("")
    good = {"prompt": "name three fruits.", "chosen": "apple, pear, plum", "rejected": "red, blue, green"}
    (here / "bad-json.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    (here / "bad-row.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": ""}) + "\n")
    margin = [{**good, "margin": 1.5}, {**good, "margin": None}]
    (here / "text.jsonl").write_text("".join(json.dumps({"text": f"row {i}: apple, pear, plum"}) + "\n" for i in range(8)))
    (here / "pc.jsonl").write_text("".join(json.dumps({"prompt": "name three fruits.", "completion": " apple"}) + "\n"
                                           for _ in range(8)))
    implicit = {"chosen": "name three fruits. apple, pear", "rejected": "name three fruits. red, blue"}
    (here / "implicit-same.jsonl").write_text(json.dumps(implicit) + "\n" + json.dumps(
        {**implicit, "rejected": implicit["chosen"]}) + "\n")
    (here / "implicit-prefix.jsonl").write_text(json.dumps(implicit) + "\n" + json.dumps(
        {**implicit, "rejected": "name three fruits."}) + "\n")
    (here / "kto-long.jsonl").write_text("".join(json.dumps(
        {"prompt": "name three fruits." + " please" * 40, "completion": "apple", "label": i % 2 == 0}) + "\n"
        for i in range(8)))
    (here / "margin-null.jsonl").write_text("".join(json.dumps(row) + "\n" for row in margin))
    (here / "latin1.yaml").write_bytes("learning_rate: 1e-4\nrun_name: caf\u00e9\n".encode("latin-1"))
    (here / "tab.yaml").write_text("learning_rate: 1e-4\nrun_name:\tx\n")
    (here / "bad.jinja").write_text("{% for m in messages %}{{ m.role }}: {{ m.content }\n{% endfor %}")
    system = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "name three vegetables."}]
    (here / "system.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt": system}) + "\n")
    answer = [{"role": "assistant", "content": "carrot, leek, pea"}]
    (here / "system-sft.jsonl").write_text(json.dumps({"messages": system[1:] + answer}) + "\n"
                                           + json.dumps({"messages": system + answer}) + "\n")
    (here / "no-system.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (here / "zephyr.jinja").write_text(  # the alignment-handbook's zephyr-7b-beta template: no generation markers
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
        "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}"
        "\n{% endfor %}")
    (here / "latin1.jinja").write_bytes("caf\u00e9 {{ messages }}".encode("latin-1"))
    (here / "gguf-folder").mkdir()
    (here / "gguf-folder" / "model-Q4_0.gguf").write_bytes(b"GGUF")
    (here / "some-folder").mkdir()
    (here / "some-folder" / "notes.txt").write_text("not a model")
    (here / "torn-adapter").mkdir()
    (here / "torn-adapter" / "adapter_config.json").write_text("{")
    shutil.copytree(presets.paths()["model"], here / "custom-code")
    config = json.loads((here / "custom-code" / "config.json").read_text())
    config.update(model_type="alignkit_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                          "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (here / "custom-code" / "config.json").write_text(json.dumps(config))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(presets.paths()["model"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(here / "lora-adapter")
    shutil.copytree(here / "lora-adapter", here / "adapter-without-weights")
    # A plain PEFT adapter (no alignkit record of its base) naming a base of the family with other layer sizes.
    from transformers import LlamaConfig, LlamaForCausalLM

    smaller = LlamaConfig(**{**base.config.to_dict(), "hidden_size": base.config.hidden_size // 2,
                             "head_dim": None, "intermediate_size": base.config.intermediate_size // 2})
    LlamaForCausalLM(smaller).save_pretrained(here / "other-shape")
    shutil.copytree(here / "lora-adapter", here / "other-shape-adapter")
    config = json.loads((here / "other-shape-adapter" / "adapter_config.json").read_text())
    (here / "other-shape-adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(here / "other-shape")}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(presets.paths()["model"]) / name).is_file():
            shutil.copy(Path(presets.paths()["model"]) / name, here / "other-shape")
    (here / "adapter-without-weights" / "adapter_model.safetensors").unlink()
    shutil.copytree(presets.paths()["model"], here / "config-only", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(presets.paths()["model"], here / "truncated")
    weights = here / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return here


def _run_as_a_command(script, args, cwd):
    """Run `script` as `python script args` would, in this process: (exit status, printed text)."""
    try:
        run_script(script, *args, cwd=cwd)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # uncaught at the top level: the interpreter hands it to sys.excepthook
        try:
            sys.excepthook(type(e), e, e.__traceback__)
        except SystemExit as exit_:
            return exit_.code
        return 1
    return 0


@pytest.mark.parametrize("script, args, says, env", CASES, ids=[f"{c[0]}:{' '.join(c[1][-2:])}" for c in CASES])
def test_bad_input_is_one_error_line_with_exit_2(bad_files, tmp_path, monkeypatch, capsys, script, args, says, env):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # what the script itself installs is what counts
    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    capsys.readouterr()
    status = _run_as_a_command(script, args, bad_files)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1, (status, err[-3000:])
    assert says in errors[0], errors[0]


def test_the_table_covers_every_script_with_at_least_30_cases():
    assert len(CASES) >= 30
    assert {c[0] for c in CASES} == {"sft.py", "label.py", "dpo.py", "kto.py", "evaluate.py", "merge.py", "reward.py",
                                     "rl.py", "rlaif.py"}


def test_what_trl_refuses_across_fields_is_one_line_naming_its_config(tmp_path):
    """A combination only TRL's config checks (it is built after the model loads): one line in TRL's words, naming
    the config, rather than transformers' traceback."""
    import torch
    from trl import SFTConfig

    from alignkit.core.args import ConfigError
    from alignkit.core.config import SFTSettings
    from alignkit.train.training import trl_config

    s = SFTSettings(preset=None, trainer_overrides={"load_best_model_at_end": True, "eval_strategy": "no"})
    with pytest.raises(ConfigError) as caught:
        trl_config(SFTConfig, s, tmp_path, torch.float32)
    line = str(caught.value)
    assert line.startswith("TRL's SFTConfig refuses these settings: ") and "load_best_model_at_end" in line
    assert "\n" not in line


def test_pairs_trl_drops_for_max_length_are_counted_in_one_line(bad_files, tmp_path, alignkit_log):
    """A tenth of the pairs, with prompts longer than --max_length, was dropped by TRL without a word: the run
    said '40 training pairs' and trained on 30."""
    good = {"prompt": "name three fruits.", "chosen": "apple, pear, plum", "rejected": "red, blue, green"}
    rows = [dict(good, prompt=good["prompt"] + " please" * 40) if i % 4 == 0 else good for i in range(40)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_script("dpo.py", "--preset", "tiny", "--output_dir", str(tmp_path / "runs"), "--dataset_id", str(data),
               "--eval_split", "0", "--max_length", "48", "--max_steps", "1", cwd=bad_files)
    assert "10 of 40 training pairs dropped: the prompt alone is at least that many tokens (--max_length 48); " \
           "raise --max_length to keep them" in alignkit_log.text



def test_the_trainers_read_trl_s_arguments_given_by_position_too():
    """alignkit's SFT, DPO, KTO and reward trainers read the datasets from kwargs alone: given by position (TRL's
    4th-6th arguments), the rows --max_length drops went uncounted and no bad row was named (the session's review).
    Each now takes TRL's arguments by name, as TRL's signature binds them."""
    from trl import DPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer

    from alignkit.train.trainers import trl_arguments

    for trl_class in (DPOTrainer, KTOTrainer):
        assert trl_arguments(trl_class, ("m", None, "cfg", None, "train", "held"), {"processing_class": "tok"}) == \
            {"model": "m", "ref_model": None, "args": "cfg", "data_collator": None, "train_dataset": "train",
             "eval_dataset": "held", "processing_class": "tok"}
    for trl_class in (SFTTrainer, RewardTrainer):
        assert trl_arguments(trl_class, ("m", "cfg", None, "train", "held"), {}) == \
            {"model": "m", "args": "cfg", "data_collator": None, "train_dataset": "train", "eval_dataset": "held"}
    with pytest.raises(TypeError):  # a clash is TRL's own TypeError, as before
        trl_arguments(SFTTrainer, ("m", "cfg", None, "train"), {"train_dataset": "again"})


def test_packed_sft_rows_are_not_counted_as_dropped(bad_files, tmp_path, alignkit_log):
    """Packing joins rows into fewer sequences of --max_length: the row count after it said "43 of 60 training rows
    dropped" (and the SmolLM3 recipe's half) where none was. A row whose prompt fills --max_length still is, unpacked."""
    from alignkit.modeling import presets

    run = run_script("sft.py", "--preset", "tiny", "--output_dir", str(tmp_path / "runs"), "--packing", "true",
                     "--max_length", "64", "--max_steps", "1", cwd=bad_files)
    assert len(run["trainer"].train_dataset) < sum(1 for _ in open(presets.paths()["sft"]))  # packed: fewer rows
    assert "dropped" not in alignkit_log.text


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="/proc is Linux's")
def test_an_output_dir_where_no_folder_can_be_made_is_refused_in_one_line():
    """Permissions alone passed --output_dir /proc/x for root (a notebook audit): the data and the model loaded, then
    the run folder failed with an 81-line FileNotFoundError. A folder is made there and removed, before any work."""
    from alignkit.core.paths import check_writable

    with pytest.raises(UserError, match=r"^--output_dir /proc/alignkit-x: "):
        check_writable("/proc/alignkit-x", "--output_dir")


def test_an_adapter_of_other_shapes_is_said_by_what_differs():
    """PEFT's size-mismatch error, said in one line: LoRA weights of other shapes name the base; embeddings saved
    whole (a vocabulary grown for the tokenizer) name the tokenizer (the review of session 30)."""
    from alignkit.modeling.models import _other_shapes

    def error(name):
        return (f"Error(s) in loading state_dict for PeftModelForCausalLM:\n\tsize mismatch for {name}: copying a "
                "param with shape torch.Size([562, 64]) from checkpoint, the shape in current model is "
                "torch.Size([561, 64]).\n\tsize mismatch for another.weight: ...")

    lora = _other_shapes("runs/a", "org/b", error("base_model.model.model.layers.0.self_attn.q_proj.lora_A.x.weight"))
    assert lora.startswith("runs/a does not fit org/b: its LoRA weights have other shapes than this base's layers "
                           "(base_model.model.model.layers.0.self_attn.q_proj.lora_A.x.weight: copying a param")
    assert lora.endswith("load it over the base it was trained on (its adapter_config.json's base_model_name_or_path, "
                         "or --base_model)") and "another.weight" not in lora
    vocab = _other_shapes("runs/a", "org/b", error("base_model.model.model.embed_tokens.weight"))
    assert "its saved embeddings hold another vocabulary size" in vocab and "load it with the tokenizer it was " \
        "trained with" in vocab
