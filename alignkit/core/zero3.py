"""DeepSpeed ZeRO-3's zero.Init for alignkit's loader: the config registered before the weights load, so that each
rank builds only its shard (establish_launch calls register_zero3_init), and set aside where one process builds a
whole model (outside_zero3)."""

from __future__ import annotations

import contextlib

from alignkit import logger
from alignkit.core.errors import UserError

_zero3_config = None  # must stay alive: transformers keeps only a weakref to it


def register_zero3_init(quantized: bool = False) -> None:
    """Under a ZeRO-3 launch with zero3_init_flag, make from_pretrained build the model partitioned (zero.Init).

    from_pretrained partitions at load time only when a DeepSpeed config is registered
    (transformers/modeling_utils.py: `needs_zero3_init = is_deepspeed_zero3_enabled() and not _is_quantized`);
    the Trainer registers one only when its TrainingArguments are built (training_args.py, "12. DeepSpeed":
    DeepSpeedPlugin().set_deepspeed_weakref()), which in the scripts comes after loading: every rank would load
    the whole model into CPU RAM. This registers the same config, read from accelerate launch's environment,
    before loading. (4-bit models are never built under zero.Init: `quantized`, the run's model is one, says so.)
    """
    global _zero3_config
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return  # TRL's config (or an HfDeepSpeedConfig of the caller's) is already registered
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("a DeepSpeed ZeRO-3 launch, but deepspeed is not installed: pip install deepspeed (on a CUDA "
                        "machine), or launch with DDP/FSDP (recipes/accelerate/ddp.yaml, fsdp.yaml)")
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()  # ACCELERATE_DEEPSPEED_* and the config file, as TrainingArguments reads them
    if not plugin.zero3_init_flag:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # the plugin registered its config on creation; zero.Init stays off as asked
        return
    plugin.set_deepspeed_weakref()
    _zero3_config = plugin
    if quantized:  # transformers: needs_zero3_init = is_deepspeed_zero3_enabled() and not _is_quantized
        logger.info("ZeRO-3 init: off for a quantized model (transformers builds none partitioned): every rank loads "
                    "the whole 4-bit base, and ZeRO-3 partitions the rest once training starts")
    else:
        logger.info("ZeRO-3 init: on (each rank loads only its shard of the weights (zero3_init_flag))")


@contextlib.contextmanager
def outside_zero3():
    """One process builds a whole model (a merge at the end of a ZeRO-3 run): DeepSpeed's registered config is set
    aside, so from_pretrained does not build under zero.Init and wait for ranks that have left."""
    from transformers.integrations import deepspeed as hf_deepspeed

    kept = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = kept
