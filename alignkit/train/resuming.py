"""A resumed run goes on as the straight run would have: the training scripts' trainers stand on EndsAtMaxSteps.

- A run resumed at its last step trains nothing more (transformers trained one step past --max_steps each time).
- TRL's count of the tokens trained (`num_tokens`) is kept with each checkpoint and goes on from it.
- Each step first raises a Ctrl-C that Python dropped inside a finalizer.
- A SIGTERM (a scheduler's stop) lets the step under way end, saves it as a checkpoint, then stops as Ctrl-C does
  (alignkit.core.errors.stop_on_sigterm): the same command resumes from that step, not the last scheduled save.
  Under a launch the processes vote at each step and all stop at the same one.
- The run folder's README.md and each checkpoint-N's are alignkit's card (alignkit.core.card), written after each
  checkpoint: TRL's trainers wrote their own into the run folder (a local base named "None"), PEFT its own into the
  checkpoint (a local base by its path), and a run stopped or killed before its end kept them.
(rl.py's sampler, which draws each epoch's prompts, resumes in alignkit.train.rl.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alignkit import logger
from alignkit.core.errors import raise_pending_interrupt, sigterm_asked, stop_for_sigterm, training_steps
from alignkit.core.journal import write_atomic
from alignkit.core.run_records import RUN_CONFIG


TOKENS_FILE = "num_tokens.json"  # in a checkpoint-N: TRL's count of the tokens trained until then


def _tokens_trained(checkpoint: Path, state) -> int:
    """The tokens trained until `checkpoint` (TRL's `num_tokens`): its TOKENS_FILE, else the last count its logs
    hold (a checkpoint saved before the file existed; the steps after that log are not counted)."""
    try:
        return int(json.loads((checkpoint / TOKENS_FILE).read_text())["num_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        logged = [e.get("num_tokens", e.get("eval_num_tokens")) for e in state.log_history]
        return int(max((n for n in logged if isinstance(n, (int, float))), default=0))


def _launched() -> bool:
    """Whether this process is one of a launch's (a process group of more than one)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def warn_if_no_step_learns(args, start: int, max_steps: int) -> bool:
    """One line before training when every optimizer step left (`start` to `max_steps`) runs at learning rate 0:
    the warmup's first step is at 0, so a `--max_steps 1` run with any warmup trained its one step at 0 and ended with
    the adapter unchanged (dpo.py: every held-out pair tied, accuracy 0.000; the evaluate audit of session 67). The
    run's own scheduler is asked (any --lr_scheduler_type); True where it warned."""
    import torch
    from transformers import get_scheduler

    warmup = args.get_warmup_steps(max_steps)
    if warmup < 1 or not start < max_steps <= start + warmup + 1 or args.learning_rate <= 0:
        return False  # no warmup, a step past its end (at the full rate), or a rate of 0 the user asked for
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except Exception:  # noqa: BLE001 - a scheduler transformers builds its own way: the training says what it says
        return False
    rates = getattr(scheduler, "lr_lambdas", None)
    if not rates or any(rates[0](step) > 0 for step in range(start, max_steps)):
        return False
    if os.environ.get("RANK", "0") != "0":
        return False  # once per launch: every process has the same schedule (alignkit._MainProcessInfo)
    steps = max_steps - start
    flag = getattr(args, "alignkit_warmup_flag", "--warmup_ratio")  # TRL's --warmup_steps overrides --warmup_ratio
    if args.max_steps > 0:
        given, fix = f"--max_steps {max_steps}", "raise --max_steps"
    else:
        given, fix = f"{max_steps} from --num_train_epochs", ("train more epochs (--num_train_epochs) or on more data, "
                                                              "or take smaller batches (--per_device_train_batch_size, "
                                                              "--gradient_accumulation_steps)")
    logger.warning(f"every optimizer step of this run trains at learning rate 0, so the adapter will not change: its "
                   f"{steps} step{'' if steps == 1 else 's'} ({given}) lie{'s' if steps == 1 else ''} inside the "
                   f"warmup's first step, where the rate is still 0 ({flag} {args.warmup_steps:g}: {warmup} warmup "
                   f"step{'' if warmup == 1 else 's'}); {fix}, or pass {flag} 0")
    return True


class EndsAtMaxSteps:
    """A run resumed at its last step (the same command run again after it finished at --max_steps) trains no
    further step. transformers checks the stop only after a step, so a resume at global_step == max_steps in the
    middle of an epoch trained one more, and each rerun another (20, 21, 22, ...; the adapter changing each time).
    Every epoch is reported as trained instead; a run finished at an epoch's end was already left alone.
    `steps_at_start`: the step training started from in this process (a resumed checkpoint's), so that saving a
    run that trained no step keeps the finished run's metrics (alignkit.train.training.finish). And each step first
    raises a Ctrl-C that Python dropped inside a finalizer (alignkit.core.errors.keep_interrupts). train() runs
    inside the training cell's `with start_run(...)` only, for a run folder start_run claimed
    (alignkit.train.cell_checks.check_in_training_cell)."""

    steps_at_start: int | None = None
    # TRL's SFT, DPO, KTO and reward trainers count the tokens trained in `_total_train_tokens`; GRPO and RLOO count
    # in the state's num_input_tokens_seen, which the checkpoint keeps (alignkit.train.rl sets this False).
    counts_own_tokens = True
    # A trainer whose steps no run resumes (LoTA's calibration, which starts again): a SIGTERM stops it unsaved.
    saves_on_sigterm = True

    def train(self, *args, **kwargs):
        from alignkit.train.cell_checks import check_in_training_cell

        check_in_training_cell(self.args.output_dir)  # not typed into a notebook after its run finished
        return super().train(*args, **kwargs)

    def training_step(self, *args, **kwargs):
        raise_pending_interrupt()  # a Ctrl-C Python dropped inside a finalizer (alignkit.core.errors.keep_interrupts)
        return super().training_step(*args, **kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     *args, **kwargs)
        self.steps_at_start = self.state.global_step
        training_steps()  # a SIGTERM from here waits for the step's end (alignkit.core.errors.stop_on_sigterm)
        resumed = args[0] if args else kwargs.get("resume_from_checkpoint")
        if resumed and self.counts_own_tokens and hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = _tokens_trained(Path(resumed), self.state)
        if 0 < max_steps <= self.state.global_step:
            logger.info(f"resumed at step {self.state.global_step} of {max_steps}: nothing left to train")
            return num_train_epochs, 0
        warn_if_no_step_learns(self.args, self.state.global_step, max_steps)
        return epochs, steps

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        """After each step (and epoch): a SIGTERM that came meanwhile saves this step as a checkpoint (after the
        logging and evaluation the step has anyway, so that the resumed run's history is the straight run's), then
        stops the training as Ctrl-C does. Under a launch every process stops at the same step (`_stop_voted`)."""
        stop = self._stop_voted(sigterm_asked())
        if stop and not self.saves_on_sigterm:
            stop_for_sigterm(f"SIGTERM at step {self.state.global_step}")
        if stop:  # saved first: the grace a scheduler gives (often 30 s) is not spent on an evaluation
            self.control.should_save = self.control.should_training_stop = True
            self.control.should_evaluate = False
            logger.info(f"SIGTERM: saving step {self.state.global_step} as a checkpoint, then stopping (a second "
                        "SIGTERM, seconds later, stops at once)")
        super()._maybe_log_save_evaluate(*args, **kwargs)
        if stop:
            stop_for_sigterm(f"SIGTERM at step {self.state.global_step}, saved as "
                             f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    _stop_vote = None  # the vote posted at the last step: (its collective, its flag, where the flag lands on the CPU)

    def _stop_voted(self, asked: bool) -> bool:
        """Whether to stop for a SIGTERM at this step: at once in one process; under a launch, where any process
        had one by the previous step. Each process's SIGTERM lands at its own point of a step (a scheduler's and the
        launcher's signals come apart): a process stopping alone would leave the others waiting in the next step's
        collective. The vote is a MAX all-reduce posted at each step and read one step later, by when it is done:
        no step waits for it (on a GPU the flag comes back through pinned memory after an event)."""
        import torch
        import torch.distributed as dist

        if not _launched():
            return asked
        stop = False
        if self._stop_vote is not None:
            work, flag, landed = self._stop_vote
            work.wait()
            if landed is not None:
                landed[1].synchronize()
                flag = landed[0]
            stop = bool(flag.item())
        device = self.accelerator.device
        flag = torch.tensor([int(asked)], dtype=torch.int32)
        if device.type == "cuda":  # from pinned memory, without waiting: a plain copy to the GPU syncs the stream
            flag = flag.pin_memory().to(device, non_blocking=True)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        landed = None
        if device.type == "cuda":
            work.wait()  # the stream waits for the collective, not this thread
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            landed = (host, event)
        self._stop_vote = (work, flag, landed)
        return stop

    def sigterm_everywhere(self) -> bool:
        """After the last step (finish): whether any process had a SIGTERM, one blocking vote that every process
        reaches at the same point, so that all stop there or none does."""
        import torch
        import torch.distributed as dist

        if not _launched():
            return sigterm_asked()
        flag = torch.tensor([int(sigterm_asked())], dtype=torch.int32, device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _save_checkpoint(self, model, trial):
        """TRL's count of the tokens trained (`num_tokens` in the logs, the card and metrics.json), kept with the
        checkpoint: TRL's SFT, DPO, KTO and reward trainers count it in the trainer and start again at 0 on resume
        (a resumed reward run reported 577,960 tokens where the straight run reported 934,860)."""
        super()._save_checkpoint(model, trial)
        run = Path(self._get_output_dir(trial=trial))
        folder = run / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and self.counts_own_tokens and hasattr(self, "_total_train_tokens"):
            if folder.is_dir():
                write_atomic(folder / TOKENS_FILE, json.dumps({"num_tokens": self._total_train_tokens}))
        if self.args.should_save and (run / RUN_CONFIG).is_file():  # a run folder alignkit claimed (start_run)
            from alignkit.core.card import write_card

            if (folder / "adapter_config.json").is_file():
                write_card(folder)  # over PEFT's card
            write_card(run, in_progress=True)  # the run in progress, at its latest checkpoint

    def create_model_card(self, *args, **kwargs):
        """TRL's trainers write TRL's card into the run folder as each checkpoint starts (`_save_checkpoint`): a
        local base is "None" there, the library transformers. alignkit's is written after the checkpoint instead."""
        return None

    def log(self, logs, *args, **kwargs):
        """The summary of a call that trained no step is kept in the state's history (finish reads it where the
        finished run's metrics.json is gone) but not shown: printed, it read as a run's figures (train_loss 0.0)."""
        if "train_runtime" not in logs or self.steps_at_start != self.state.global_step:
            return super().log(logs, *args, **kwargs)
        handler = self.callback_handler
        handler.on_log = lambda args, state, control, logs: control
        try:
            return super().log(logs, *args, **kwargs)
        finally:
            del handler.on_log  # the class's own again
