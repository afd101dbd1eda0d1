"""A stand-in for the `vllm` package, which needs a CUDA GPU: records what alignkit asks of it.

`install(monkeypatch)` puts `vllm`, `vllm.lora` and `vllm.lora.request` in sys.modules (with a module spec, so
`importlib.util.find_spec("vllm")` finds it as it would a real install). Each answer is "vllm says: " and the
last user message, padded with spaces that the backend must strip.
"""

from __future__ import annotations

import copy
import importlib.machinery
import sys
import types


class Recorder:
    def __init__(self):
        self.llms: list[FakeLLM] = []
        self.fail_on_call: int | None = None  # the chat call (1, 2, ...) that raises, like a crashed engine
        self.calls = 0

    @property
    def chats(self) -> list[dict]:
        return [chat for llm in self.llms for chat in llm.chats]


class FakeLLM:
    recorder: Recorder

    def __init__(self, **kwargs):
        self.kwargs, self.chats = kwargs, []
        self.recorder.llms.append(self)

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None, chat_template=None, tools=None,
             chat_template_kwargs=None):
        self.recorder.calls += 1
        if self.recorder.calls == self.recorder.fail_on_call:
            raise RuntimeError("fake vLLM engine died")
        params = [p.kwargs for p in sampling_params] if isinstance(sampling_params, list) else sampling_params.kwargs
        self.chats.append({"messages": copy.deepcopy(messages), "params": params,
                           "lora": lora_request, "chat_template": chat_template, "tools": tools,
                           "chat_template_kwargs": chat_template_kwargs})
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"  vllm says: {m[-1]['content']}\n")])
                for m in messages]


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class LoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


def install(monkeypatch, cuda: bool = False) -> Recorder:
    """Fake vLLM for this test; cuda=True also makes torch report a GPU (what `--backend auto` looks for)."""
    import torch

    recorder = Recorder()
    llm = type("LLM", (FakeLLM,), {"recorder": recorder})
    contents = {"vllm": {"LLM": llm, "SamplingParams": SamplingParams}, "vllm.lora": {},
                "vllm.lora.request": {"LoRARequest": LoRARequest}}
    for name, attributes in contents.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    if cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * 2**30, 80 * 2**30))  # free, total
    return recorder
