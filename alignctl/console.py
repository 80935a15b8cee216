"""What the console shows during a run, and what only the run log keeps.

* one progress bar per stage (steps, ETA, loss and the stage's key metric) on stderr when it is a terminal;
  otherwise one compact line per stage when its training ends;
* alignctl's own lines (stage started / evaluated / completed, warnings); the per-step metric lines only in
  ``alignctl.log`` (on the console too with ``alignctl run -v``);
* library warnings (transformers, TRL, datasets, torch ``UserWarning``s, bitsandbytes) go to the run log only;
  the libraries' progress bars (datasets' ``Map``, weight loading/saving) are switched off.

Nothing here imports torch at module level; :func:`setup` imports transformers/datasets when they are installed.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from alignctl.metrics import fmt as _fmt  # the one number format of tables and reports

log = logging.getLogger("alignctl")

VERBOSE_ENV = "ALIGNCTL_VERBOSE"
# The metric shown beside the loss, per trainer class (TRL's logged names); the first one logged wins.
KEY_METRICS = {
    "SFTTrainer": ("mean_token_accuracy",), "DPOTrainer": ("rewards/accuracies",),
    "ORPOTrainer": ("rewards/accuracies",), "CPOTrainer": ("rewards/accuracies",), "KTOTrainer": ("rewards/margins",),
    "RewardTrainer": ("accuracy",), "PPOTrainer": ("objective/scores",), "GRPOTrainer": ("reward",),
    "RLOOTrainer": ("reward",),
}
LOSS_KEYS = ("loss", "loss/policy_avg")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class ConsoleFilter(logging.Filter):
    """On the console: alignctl's and Hydra's lines except per-step details, and errors; everything with -v."""

    def __init__(self, show_all: bool = False):
        super().__init__()
        self.show_all = show_all

    def filter(self, record: logging.LogRecord) -> bool:
        if self.show_all:
            return True
        if getattr(record, "detail", False):
            return False
        name = record.name
        if name == "alignctl" or name.startswith(("alignctl.", "hydra")):
            return True
        return record.levelno >= logging.ERROR and name != "py.warnings"


class ConsoleFormatter(logging.Formatter):
    """The message alone; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info and self.show_traceback:
            msg += "\n" + self.formatException(record.exc_info)
        return msg

    show_traceback = False


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to the terminal (Hydra's console handler), not a file or another program's capture."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
        getattr(handler, "stream", None) in streams


def setup(show_all: bool | None = None) -> None:
    """Quiet the console of a run (see the module docstring); the file handlers keep everything."""
    show_all = verbose() if show_all is None else show_all
    for handler in logging.getLogger().handlers:
        if _is_console(handler) and not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter(show_all))
            if not show_all:
                handler.setFormatter(ConsoleFormatter())
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger -> the run log
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as tlog

        tlog.disable_default_handler()  # its records propagate to the root logger: the run log (and -v console)
        tlog.enable_propagation()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets
        from datasets.utils import logging as dlog

        datasets.disable_progress_bars()
        library = logging.getLogger("datasets")
        for h in list(library.handlers):
            library.removeHandler(h)
        library.propagate = True
        dlog.set_verbosity_warning()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def progress_callback(trainer, stage: str):
    """A TrainerCallback showing the stage's progress: a rich bar on a terminal, else one line at the end."""
    from transformers import TrainerCallback

    keys = KEY_METRICS.get(type(trainer).__name__, ())
    tty = sys.stderr.isatty()

    class StageProgress(TrainerCallback):
        def __init__(self):
            self.loss = self.key = self.bar = self.task = None
            self.key_name, self.t0 = None, None

        def _extra(self) -> str:
            parts = [f"loss {_fmt(self.loss)}"] if self.loss is not None else []
            if self.key is not None:
                parts.append(f"{self.key_name} {_fmt(self.key)}")
            return ", ".join(parts)

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()
            if tty and state.is_world_process_zero:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(TextColumn(f"[bold]{stage}[/bold]"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[extra]}"), console=Console(stderr=True))
                self.bar.start()
                self.task = self.bar.add_task(stage, total=state.max_steps or None, extra="")

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step, extra=self._extra())

        def on_log(self, args, state, control, logs=None, **kwargs):
            for k in LOSS_KEYS:
                if isinstance((logs or {}).get(k), (int, float)):
                    self.loss = logs[k]
                    break
            for k in keys:
                if isinstance((logs or {}).get(k), (int, float)):
                    self.key, self.key_name = logs[k], k
                    break

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step, extra=self._extra())
                self.bar.stop()
                self.bar = None
                return
            if state.is_world_process_zero:
                log.info("[%s] trained %d/%d steps in %.1f s%s", stage, state.global_step, state.max_steps,
                         time.time() - (self.t0 or time.time()), f": {self._extra()}" if self._extra() else "")

    return StageProgress()


def eval_line(stage: str, metrics: dict) -> str | None:
    """One console line for a stage's held-out generation evaluation (alignctl.evaluate), or None."""
    info, before, after = metrics.get("eval") or {}, metrics.get("before") or {}, metrics.get("after") or {}
    if info.get("skipped"):
        return f"[{stage}] held-out samples skipped: {info['skipped']}"
    if "eval_kl" not in after:
        return None
    parts = [f"KL to reference {after['eval_kl']:.3g}/token ({after['eval_kl_seq']:.3g}/answer)"]
    if "eval_reward_mean" in after and "eval_reward_mean" in before:
        parts.append(f"reward {before['eval_reward_mean']:.3g} -> {after['eval_reward_mean']:.3g}")
    if "eval_win_rate" in after:
        from alignctl.metrics import win_text

        parts.append(f"win rate {win_text(after)}")
    took = f" in {info['seconds']:.1f} s" if isinstance(info.get("seconds"), (int, float)) else ""
    return (f"[{stage}] held-out answers ({info.get('prompts')} prompts, <= {info.get('max_new_tokens')} tokens"
            f"{took}): " + ", ".join(parts))
