"""The one loader: hardware choices with one log line each, tokenizer safety, adapter chains, generation backends."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

from alignkit.core import kernels, launch
from alignkit.core.args import ConfigError
from alignkit.core.config import DPOSettings, ModelSettings
from alignkit.modeling import generation, models, presets




def test_auto_choices_on_a_cpu_say_what_and_why(alignkit_log):
    assert not torch.cuda.is_available()  # these tests describe the CPU path
    assert launch.resolve_dtype("auto") == torch.float32
    assert launch.resolve_quantization("auto") == "none"
    assert kernels.resolve_attention("auto") == "sdpa"
    assert kernels.resolve_liger("auto") is False
    text = alignkit_log.text
    assert "dtype: fp32 (no CUDA device" in text and "quantization: none" in text and "attention: sdpa" in text
    # Explicit choices are honoured and need no explanation.
    assert launch.resolve_dtype("bf16") == torch.bfloat16 and launch.resolve_quantization("4bit") == "4bit"



def test_a_training_load_says_the_dtype_it_was_given(tiny_cache, alignkit_log):
    """A recipe's `torch_dtype: bfloat16` on the CPU trained in bf16 without a dtype line, where auto says its
    choice (audit): a training run says its dtype in every case."""
    from alignkit.core.config import SFTSettings
    from alignkit.modeling import presets
    from alignkit.modeling.models import load_model

    loaded = load_model(SFTSettings(model_id=presets.paths()["model"], dtype="bf16", quantization="none"),
                        for_training=True)
    assert loaded.dtype == torch.bfloat16
    assert "dtype: bf16 (as given: --dtype, or TRL's torch_dtype, bf16 or fp16" in alignkit_log.text


def test_a_training_load_records_the_attention_it_runs(tiny_cache, alignkit_log):
    """A handbook recipe's `attn_implementation: flash_attention_2` on a CPU runs sdpa (said in the log), but the run's
    alignkit_config.json and card said flash_attention_2 only: `loaded_as` (which both show) had no attention (the
    dpo.py audit of session 33). It records the one the model runs, beside the resolved dtype and quantization."""
    from alignkit.core.config import DPOSettings
    from alignkit.core.run_records import loaded_as
    from alignkit.modeling import presets
    from alignkit.modeling.models import load_model

    model_id = presets.paths()["model"]
    load_model(DPOSettings(model_id=model_id, dtype="bf16", attn_implementation="flash_attention_2",
                           quantization="none"), for_training=True)
    assert "attention: sdpa (flash_attention_2 was asked for" in alignkit_log.text
    assert loaded_as(model_id) == {"quantization": "none", "dtype": "bfloat16", "attention": "sdpa"}


def test_liger_asked_for_where_it_cannot_run_goes_on_without_it_in_one_line(alignkit_log, monkeypatch):
    """The SmolLM3 recipes' use_liger_kernel: true failed with ModuleNotFoundError after the model loaded, on a CPU
    or a GPU without liger-kernel. Like flash_attention_2 asked for there, the run goes on without it, in one line."""
    import importlib.util

    alignkit_log.clear()
    assert kernels.resolve_liger("true") is False and kernels.resolve_liger("false") is False
    assert alignkit_log.messages == ["liger: off (no CUDA device: Liger's Triton kernels need one (use_liger true was "
                                     "asked for))"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU without liger-kernel
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    alignkit_log.clear()
    assert kernels.resolve_liger("true") is False
    assert alignkit_log.messages == ["liger: off (liger-kernel is not installed: pip install 'alignkit[gpu]' (use_liger "
                                     "true was asked for))"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    assert kernels.resolve_liger("true") is True and kernels.resolve_liger("auto") is True


def test_gpu_defaults_follow_the_seed():
    s = DPOSettings()
    assert s.model_id == "mistralai/Mistral-7B-Instruct-v0.2"
    assert s.dataset_id == "argilla/ultrafeedback-binarized-preferences-cleaned"
    assert (s.quantization, s.dtype, s.attn_implementation, s.dpo_beta) == ("auto", "auto", "auto", 0.1)
    assert s.lora_target_modules == ["all-linear"] and s.trust_remote_code is False


def test_pad_token_is_never_the_eos_token(tiny_cache):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(presets.paths()["model"])
    tok.pad_token = tok.eos_token  # the trap: padding masks would hide the end of every answer
    models.set_pad_token(tok)
    assert tok.pad_token is not None and tok.pad_token != tok.eos_token
    assert tok.pad_token in tok.get_vocab()


def test_a_chat_model_without_a_template_is_a_clear_error(tiny_cache, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(presets.paths()["model"])
    tok.chat_template = None
    with pytest.raises(ValueError, match="--chat_template FILE"):
        models.require_chat_template(tok, "my/model")
    template = tmp_path / "chat.jinja"
    template.write_text(presets.CHAT_TEMPLATE)
    loaded = models.load_tokenizer(presets.paths()["model"], chat_template=str(template))
    assert loaded.chat_template == presets.CHAT_TEMPLATE


def test_adapter_chain_is_read_from_adapter_configs(tmp_path):
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    for folder, base in ((sft, "org/base-model"), (dpo, str(sft))):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 8}))
    assert models.adapter_chain(str(dpo)) == ("org/base-model", [str(sft), str(dpo)])
    assert models.adapter_chain(str(tmp_path)) == (str(tmp_path), [])  # a folder without adapter is a model
    (sft / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(dpo)}))
    with pytest.raises(ValueError, match="longer than 8"):
        models.adapter_chain(str(dpo))


def test_generation_stops_at_the_end_of_turn(tiny_cache):
    loaded = models.load_model(ModelSettings(model_id=presets.paths()["model"], quantization="none"))
    answers = generation.generate(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "name three fruits."}]] * 3,
                                  max_new_tokens=40)
    # Greedy, batched, left-padded: three identical answers, short, without template tokens.
    assert len(set(answers)) == 1 and "<|" not in answers[0] and len(answers[0].split(",")) == 3


def test_batches_of_similar_length_answer_in_the_callers_order(tiny_cache):
    """generate batches prompts by length, not in the order given: each answer must still land on its prompt."""
    loaded = models.load_model(ModelSettings(model_id=presets.paths()["model"], quantization="none"))
    prompts = ["name three fruits.", "could you please list three colours that you like?", "three tools?",
               "which three animals would you name if you were asked for some animals?", "name three sports."]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    one_by_one = [generation.generate(loaded.model, loaded.tokenizer, [c], max_new_tokens=20)[0] for c in conversations]
    batched = generation.generate(loaded.model, loaded.tokenizer, conversations, max_new_tokens=20, batch_size=2)
    assert len(set(one_by_one)) >= 3  # answers differ by prompt, so a misplaced answer would show
    assert batched == one_by_one


def test_ragged_prefill_answers_as_the_padded_batch_does(tiny_cache, monkeypatch):
    """Prompts of mixed lengths in one batch: the cache is computed row by row without padding, and generation
    continues from it to the same answers as the padded batch's and as each prompt's alone (greedy)."""
    loaded = models.load_model(ModelSettings(model_id=presets.paths()["model"], quantization="none"))
    prompts = ["three tools?", "name three fruits.", "which three animals would you name if you were asked, "
               "on a long walk through the park on a sunny day, for the names of some animals?"]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    used, real = [], generation.ragged_prefill
    monkeypatch.setattr(generation, "ragged_prefill", lambda *a: used.append(real(*a)) or used[-1])
    ragged = generation.generate(loaded.model, loaded.tokenizer, conversations, max_new_tokens=20, batch_size=3)
    assert used and used[-1], "the ragged prefill did not apply to a batch that is mostly padding"
    monkeypatch.setattr(generation, "RAGGED_PREFILL_PADDING", 1.1)  # never: the plain padded batch
    padded = generation.generate(loaded.model, loaded.tokenizer, conversations, max_new_tokens=20, batch_size=3)
    assert not used[-1]
    one_by_one = [generation.generate(loaded.model, loaded.tokenizer, [c], max_new_tokens=20)[0] for c in conversations]
    assert len(set(one_by_one)) == 3 and ragged == padded == one_by_one


def test_a_sampled_answer_depends_on_its_own_seed_not_on_its_batch(tiny_cache, monkeypatch):
    """Sampling drew every row from torch's one stream, seeded per call: an answer changed with the other rows of
    its batch and with --batch_size, so a rerun asking fewer questions, or a resumed label.py run, mixed answers from
    other streams under one settings key. With a seed per row each answer is its own, in any batch; the draws
    follow temperature and top_p as transformers' sampling does."""
    loaded = models.load_model(ModelSettings(model_id=presets.paths()["model"], quantization="none"))
    prompts = ["name three fruits.", "three tools?", "which three animals would you name?", "name three sports."]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    seeds = [11, 22, 33, 44]

    def sample(rows, batch_size, temperature=1.5, top_p=0.95, **kw):
        return generation.generate(loaded.model, loaded.tokenizer, [conversations[i] for i in rows],
                                   max_new_tokens=16, temperature=temperature, top_p=top_p, batch_size=batch_size,
                                   seeds=[seeds[i] for i in rows], **kw)

    together = sample([0, 1, 2, 3], 4)
    assert sample([3, 1], 2) == [together[3], together[1]]  # other company, another batch size
    assert [sample([i], 1)[0] for i in range(4)] == together
    assert sample([0, 1, 2, 3], 4, seed=5) == together  # the call's seed does not enter a row's stream
    again = [11, 22, 33, 44]
    seeds[:] = [12, 23, 34, 45]
    assert sample([0, 1, 2, 3], 4) != together  # another seed, other samples (at temperature 1.5)
    seeds[:] = again
    greedy = generation.generate(loaded.model, loaded.tokenizer, conversations, max_new_tokens=16)
    assert sample([0, 1, 2, 3], 4, temperature=0.0) == greedy  # temperature 0: greedy, seeds or not

    # Beam sampling (--num_beams > 1 at a temperature) was seeded per batch, by its rows: an answer changed with the
    # company it kept. Each goes alone now, seeded by its own seed.
    beams = sample([0, 1, 2, 3], 4, num_beams=2)
    assert sample([3, 1], 2, num_beams=2) == [beams[3], beams[1]]

    # Sampling is transformers' own (its warpers: temperature, its default top_k 50, top_p), only each row's draw is
    # its own: one row alone with its seed samples exactly what transformers samples from torch seeded alike.
    for i in range(4):
        plain = generation.generate(loaded.model, loaded.tokenizer, [conversations[i]], max_new_tokens=16,
                                    temperature=1.5, top_p=0.95, seed=seeds[i] % 2**63)
        assert [plain] == [sample([i], 1)], i


def test_per_row_sampling_is_the_sampling_thread_s_alone():
    """rows_sampled replaced torch.multinomial for the whole process while open: another thread's draw over as many
    rows (a second generator, a data loader) took the per-row streams, and two threads' contexts restored each
    other's patch. Now only the thread that opened it samples row by row."""
    import threading

    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    opened, release = threading.Event(), threading.Event()

    def holds_it_open():
        with generation.rows_sampled([1, 2]) as draws:
            opened.set()
            release.wait(30)
            torch.multinomial(probs, 4, True)
        assert draws == [1]

    worker = threading.Thread(target=holds_it_open)
    worker.start()
    assert opened.wait(30)
    try:
        torch.manual_seed(0)
        here = torch.multinomial(probs, 64, True)
        torch.manual_seed(0)
        assert torch.equal(here, generation._REAL_MULTINOMIAL(probs, 64, True))  # torch's own stream here
    finally:
        release.set()
        worker.join(30)
    assert torch.multinomial is generation._REAL_MULTINOMIAL  # put back once no thread has it open


def test_generation_backend_falls_back_with_a_reason(alignkit_log, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert generation.resolve_backend("auto") == "transformers"
    assert "vLLM is not installed" in alignkit_log.text
    with pytest.raises(ValueError, match="pip install vllm"):
        generation.resolve_backend("vllm")


def test_the_fresh_adapter_starts_from_the_seed(tiny_cache):
    """--seed fixes LoRA's random A matrices, so two runs (or a resumed run and its straight twin) start alike."""

    def first_lora_a(seed: int) -> torch.Tensor:
        s = DPOSettings(model_id=presets.paths()["model"], seed=seed, lora_r=4, lora_alpha=8)
        torch.seed()  # a random global state, as in a fresh process: only --seed may decide the weights
        model = models.add_trainable_adapter(models.load_model(s, for_training=True), s)
        return next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(first_lora_a(1), first_lora_a(1))
    assert not torch.equal(first_lora_a(1), first_lora_a(2))


# ---------------------------------------------------------------------------------------------------------
# load_generator: one entry point, vLLM or transformers


def test_the_transformers_backend_answers_as_generate_does(tiny_cache):
    s = ModelSettings(model_id=presets.paths()["model"], quantization="none")
    conversations = [[{"role": "user", "content": "name three fruits."}], [{"role": "user", "content": "hi"}]]
    loaded = models.load_model(s)
    expected = generation.generate(loaded.model, loaded.tokenizer, conversations, max_new_tokens=12)
    with generation.load_generator(s, "transformers") as generator:
        assert isinstance(generator, generation.TransformersGenerator)
        assert generator(conversations, max_new_tokens=12) == expected
    assert generator.loaded is None  # leaving the block let go of the model


def _adapter(folder, base, r=8):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": r}))
    return str(folder)


def test_auto_picks_vllm_on_a_gpu_and_serves_an_adapter_on_its_base(tiny_cache, tmp_path, monkeypatch, alignkit_log):
    from fake_vllm import install

    fake = install(monkeypatch, cuda=True)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("vLLM was chosen: no transformers model"))
    base = presets.paths()["model"]
    adapter = _adapter(tmp_path / "adapter", base, r=12)
    assert generation.resolve_backend("auto") == "vllm"
    assert "generation backend: vllm (installed, CUDA available)" in alignkit_log.text

    conversations = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "name three fruits."}],
                     [{"role": "user", "content": "hi"}]]
    with generation.load_generator(ModelSettings(model_id=adapter, dtype="bf16"), "auto") as generator:
        answers = generator(conversations, max_new_tokens=7, temperature=0.0, top_p=0.9, batch_size=1, seed=3)
        sampled = generator(conversations[1:], max_new_tokens=5, temperature=0.8, top_p=0.9, seed=4)
    assert answers == ["vllm says: name three fruits.", "vllm says: hi"]  # in order, stripped
    assert sampled == ["vllm says: hi"]
    (llm,) = fake.llms
    assert llm.kwargs["model"] == base and llm.kwargs["tokenizer"] == base  # the adapter saved no tokenizer
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 16  # r=12, rounded up
    assert llm.kwargs["dtype"] == "bfloat16"
    first, second = llm.chats
    assert first["messages"] == conversations
    assert first["params"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 7, "seed": 3}  # greedy: no top_p
    assert second["params"] == {"temperature": 0.8, "top_p": 0.9, "max_tokens": 5, "seed": 4}
    assert (first["lora"].lora_path, first["lora"].lora_int_id) == (adapter, 1)
    assert first["chat_template"] == models.load_tokenizer(base).chat_template  # the one transformers would use

    with generation.load_generator(ModelSettings(model_id=base), "vllm"):  # a plain model: no LoRA
        pass
    assert fake.llms[1].kwargs["enable_lora"] is False and fake.llms[1].kwargs["dtype"] == "auto"
    chain = _adapter(tmp_path / "dpo", adapter)
    with pytest.raises(ValueError, match=r"chain of 2 adapters.*merge\.py --adapter_dir"):
        generation.load_generator(ModelSettings(model_id=chain), "vllm")
    # Beam search is transformers' only: auto falls back to it, an explicit --backend vllm is refused.
    assert generation.resolve_backend("auto", num_beams=2) == "transformers"
    with pytest.raises(ConfigError, match="--num_beams > 1"):
        generation.resolve_backend("vllm", num_beams=2)


def test_backend_is_one_of_three():
    from alignkit.core.args import parse_config
    from alignkit.core.config import LabelSettings, VibesSettings

    for cls in (LabelSettings, VibesSettings):
        assert cls().backend == "auto"
        with pytest.raises(ConfigError, match=r"--backend: 'gpu' is not one of auto, vllm, transformers"):
            parse_config(cls, args=["--backend", "gpu"], env_file=None)


def test_a_run_path_not_there_names_the_working_folder_and_the_folder_above_that_holds_it(tmp_path, monkeypatch):
    """Found by a notebook audit: merge.ipynb (kto.ipynb alike) with `runs/tiny-dpo`, opened from notebooks/ (a
    kernel's working folder) while the runs are in the project's runs/, said the Hugging Face cache holds no copy and
    to unset HF_HUB_OFFLINE to download it. A path that names a local folder (alignkit's runs/, a first part that is
    a folder here, or a path found above) says where it was looked for and where it is, in one line."""
    from huggingface_hub import constants

    from alignkit.core.errors import UserError
    from alignkit.modeling.model_folders import check_model_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "runs" / "tiny-dpo").mkdir(parents=True)
    (tmp_path / "notebooks" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "notebooks")
    here = str(tmp_path / "notebooks")
    for source in ("runs/tiny-dpo", "./runs/tiny-dpo"):
        with pytest.raises(UserError) as refused:
            check_model_source(source)
        said = str(refused.value)
        assert said.startswith(f"model not found: {source} is no local folder (relative to the working folder {here}: "
                               "in a notebook, the notebook's folder)")
        assert said.endswith("; found at ../runs/tiny-dpo: pass that path") and "HF_HUB_OFFLINE" not in said
        assert "\n" not in said
    for source in ("runs/nope-sft", "data/nope"):  # a run not trained; a folder here holding no such model
        with pytest.raises(UserError, match=rf"^model not found: {source} is no local folder \(relative to the working "
                                            rf"folder {re.escape(here)}: .*, nor a Hub id the Hugging Face cache holds; "
                                            r"check the path \(a run: train it first\)$"):
            check_model_source(source)
    # A Hub id, no folder of its name anywhere: the cache's line, downloading named.
    with pytest.raises(UserError, match=r"^model not found: org/model is no local folder, and HF_HUB_OFFLINE=1 .* "
                                        r"unset HF_HUB_OFFLINE to download it$"):
        check_model_source("org/model")


@contextlib.contextmanager
def fake_hub(handler, monkeypatch):
    """A Hub at a local port answering with `handler` (online, HF_HUB_OFFLINE off) while the block runs."""
    import http.server
    import threading

    from huggingface_hub import constants

    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()


def test_with_the_hub_answering_a_model_it_lacks_is_one_line_in_the_settings_cell(tmp_path, monkeypatch):
    """Found by the notebook audit of session 125: dpo.ipynb with `model_id = "runs/tiny-sft"` opened from notebooks/
    (the runs one folder up) on a machine online passed the settings and data cells, and its Model cell ended in
    transformers' OSError traceback ("not a local folder and is not a valid model identifier"), 50 lines; a Hub id
    the Hub lacks (a typo) alike. Now the settings cell (preflight) says it in one line, the path's with where it
    was looked for and found; a gated model the Hub says exists is no refusal."""
    import http.server

    from alignkit.core.args import parse_config
    from alignkit.core.errors import UserError
    from alignkit.modeling.model_folders import check_model_source
    from alignkit.train.training import preflight

    class Hub(http.server.BaseHTTPRequestHandler):  # answers; has no model but org/gated, behind an access request
        def _answer(self):
            gated = "/org/gated" in self.path
            self.send_response(403 if gated else 401)
            self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    with fake_hub(Hub, monkeypatch):
        (tmp_path / "runs" / "tiny-sft").mkdir(parents=True)
        (tmp_path / "notebooks").mkdir()
        monkeypatch.chdir(tmp_path / "notebooks")
        here = str(tmp_path / "notebooks")
        s = parse_config(DPOSettings, args=["--model_id", "runs/tiny-sft"], env_file=None)
        with pytest.raises(UserError) as refused:
            preflight(s)
        assert str(refused.value) == (
            f"model not found: runs/tiny-sft is no local folder (relative to the working folder {here}: in a notebook, "
            "the notebook's folder), nor a model on the Hub; found at ../runs/tiny-sft: pass that path")
        with pytest.raises(UserError, match=r"^model not found: org/typo is no local folder, and the Hub has no model "
                                            r"of that name \(a private or gated one needs your token: .*check the name$"):
            check_model_source("org/typo", cache=False)
        check_model_source("org/gated", cache=False)  # there, if not to everyone: the load asks with the token
    # The Hub silent (its port closed): the path's line still, not "set HF_HUB_OFFLINE=1 ... --preset tiny", which
    # fixes no path; a Hub id keeps the unreachable Hub's line.
    import socket

    with socket.socket() as free:  # a port nothing listens on (the probe's answer is kept per endpoint)
        free.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free.getsockname()[1]}")
    for check in (lambda: check_model_source("runs/tiny-sft", cache=False), lambda: preflight(s)):  # the cell's too
        with pytest.raises(UserError) as refused:
            check()
        assert str(refused.value) == (
            f"model not found: runs/tiny-sft is no local folder (relative to the working folder {here}: in a notebook, "
            "the notebook's folder); found at ../runs/tiny-sft: pass that path")
    with pytest.raises(UserError, match=r"^cannot reach the Hugging Face Hub at .*org/typo"):
        check_model_source("org/typo", cache=False)
    with pytest.raises(UserError, match=r"^cannot reach the Hugging Face Hub at .* to fetch org/typo, \S+ \(no local"):
        preflight(parse_config(DPOSettings, args=["--model_id", "org/typo"], env_file=None))  # the dataset named too


def test_a_hub_slow_to_answer_about_a_model_costs_its_timeout_once_a_process(monkeypatch):
    """Review of 0afe055: preflight and the load each asked the Hub (model_info) about the model, so a Hub that
    answered its probe but not that question within the timeout (10 s) cost it twice before training, and once more
    for each check after (an evaluation's models and their bases). An answer other than "no such model" is kept."""
    import http.server
    import time

    from alignkit.core import sources
    from alignkit.modeling.model_folders import check_model_source

    asked = []

    class Hub(http.server.BaseHTTPRequestHandler):  # answers its probe at once, the model's question too late
        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            asked.append(self.path)
            time.sleep(1)

        def log_message(self, *args):
            pass

    with fake_hub(Hub, monkeypatch):
        monkeypatch.setattr(sources, "PROBE_TIMEOUT", 0.1)
        for _ in range(3):  # preflight, the load, a later check: no refusal, the load says what the Hub did not
            check_model_source("org/slow", cache=False)
    assert [path for path in asked if "org/slow" in path] == ["/api/models/org/slow"], asked
