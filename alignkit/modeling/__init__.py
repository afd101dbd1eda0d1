"""Models: loading, generating, merging, and the presets that build a model offline.

- models: the one loader (base, adapter chains; its hardware decisions: alignkit.core.launch).
- model_folders: a model source checked before it loads (a whole local model, adapter or delta, or a Hub id).
- reward_models: a reward model (score head) told from a causal LM, its base loaded, the LM head beside it.
- template_rows: a row or prompt the chat template refuses (`raise_exception`), named in one line.
- chain: where a model comes from (a Hub id or a local path) and its adapter chain down to the base.
- identity: the one identity of a model as loaded (settings, files down the adapter chain, GGUF file, backend,
  hardware), which every cache of model outputs keys on.
- lineage: what a run trained over, by content: an adapter over a part trained again in place is refused.
- gguf: GGUF files converted once into a model folder.
- generation: local answering engines (transformers, vLLM).
- merge: adapters merged into their base and checked.
- lota_delta: a LoTA sparse delta as a model part (its parametrization, files, and how every loader adds it).
- experts: a mixture of experts' fused experts under LoRA and 4-bit (said, or refused before the weights load).
- presets: the offline `tiny` demo and its rule.
- smol: the `smol` preset, SmolLM2-135M-Instruct (its prompts: smol_prompts.jsonl).
"""
