"""Shared infrastructure: what every stage and every script stands on.

- args: the one settings mechanism (flags, env, .env, --config, presets).
- config: every script's settings dataclasses, shared groups by composition.
- errors: UserError and how a script reports it.
- extras: the optional eval and tracking extras, and the one line that installs a missing one.
- paths: the cache folder ($ALIGNKIT_CACHE).
- journal: append-only logs, atomic writes, the concurrent map every crash-safe loop uses.
- progress: the one progress-bar rule (a bar in a terminal and a notebook, none in CI logs).
- data: the one data normaliser (SFT and preference rows from files, folders, the Hub).
- hub: Hub pushes.
- card: model cards through huggingface_hub's ModelCard (license, model-index, citations).
- llm: the chat-client factory for OpenAI-compatible endpoints.
"""
