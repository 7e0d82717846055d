"""`StepProgressBar`: a progress bar that counts optimizer steps, shows tokens/s for SAE runs, and prints lines
when the output is not a terminal.

In online SAE training one Lightning batch is one SAE step (see
:mod:`~prisma_lightning.modules.activation_stream`), so the bar's total is ``max_steps``. The bar shows the loss
and, for modules that count training rows (``tokens_seen``), the token throughput. When standard output is not a
terminal (a log file, CI), a bar redrawn in place would only appear at the end (the stream is block-buffered): the
callback then prints one flushed line every ``print_every`` steps (default: 20 lines per run, at most one every
``min_seconds``) instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


def _rows_seen(pl_module: Any) -> int | None:
    seen = getattr(pl_module, "tokens_seen", None)
    if isinstance(seen, dict):
        groups = getattr(pl_module, "groups", {})
        return int(sum(g.tokens_seen for g in groups.values())) if groups else int(sum(seen.values()))
    if seen is None:
        return None
    return int(seen)


class StepProgressBar(TQDMProgressBar):
    """TQDM bar of optimizer steps with loss and tokens/s; plain periodic lines when stdout is not a terminal.

    Args:
        refresh_rate: redraw every this many batches (terminal mode).
        print_every: in line mode, print every this many steps (default: about 20 lines per run).
        min_seconds: in line mode, at most one line per this many seconds (except the last step).
    """

    def __init__(self, refresh_rate: int = 1, print_every: int | None = None, min_seconds: float = 10.0) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.print_every, self.min_seconds = print_every, min_seconds
        self.line_mode = not sys.stdout.isatty()
        if self.line_mode:
            self.disable()  # no bars redrawn in place: periodic lines instead
        self._t0 = self._last_print = 0.0
        self._step0 = 0
        self._rate: float | None = None
        self._last_rows: int | None = None
        self._last_time = 0.0

    # ------------------------------------------------------------------ metrics
    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self._rate is not None:
            metrics["tokens/s"] = f"{self._rate:,.0f}"
        return metrics

    def _update_rate(self, pl_module: Any) -> None:
        rows, now = _rows_seen(pl_module), time.perf_counter()
        if rows is None:
            return
        if self._last_rows is not None and now > self._last_time and rows > self._last_rows:
            rate = (rows - self._last_rows) / (now - self._last_time)
            self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
        self._last_rows, self._last_time = rows, now

    # ------------------------------------------------------------------ terminal / line mode
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0 = self._last_print = time.perf_counter()
        self._step0 = trainer.global_step
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if not self.line_mode:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            if total is not None and self.train_progress_bar is not None:
                self.train_progress_bar.reset(total=total)
                self.train_progress_bar.n = trainer.global_step
                self.train_progress_bar.set_description("Steps")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._update_rate(pl_module)
        if not self.line_mode:
            n = trainer.global_step if trainer.max_steps and trainer.max_steps > 0 else batch_idx + 1
            if self._should_update(n, self.train_progress_bar.total):
                self.train_progress_bar.n = n
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
                self.train_progress_bar.refresh()
            return
        self._print_line(trainer, pl_module)

    def _print_line(self, trainer: Any, pl_module: Any) -> None:
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        every = self.print_every or max(1, (total or 1000) // 20)
        now = time.perf_counter()
        last = total is not None and step >= total
        if not last and (step % every or now - self._last_print < self.min_seconds):
            return
        self._last_print = now
        parts = [f"step {step:,}" + (f"/{total:,}" if total else "")]
        loss = trainer.callback_metrics.get("loss", trainer.callback_metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        if self._rate is not None:
            parts.append(f"{self._rate:,.0f} tokens/s")
        elapsed = now - self._t0
        parts.append(f"{elapsed:,.0f}s")
        if total and step:
            parts.append(f"eta {elapsed / max(step - self._step0, 1) * (total - step):,.0f}s")
        print(" | ".join(parts), flush=True)
