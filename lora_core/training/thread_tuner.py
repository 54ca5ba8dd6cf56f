"""CPU training picks its intra-op thread count by measuring it, and measures again as load changes.

Why: torch runs every op on `torch.get_num_threads()` OpenMP threads (default: one per core).
On a machine whose cores are shared with busier neighbours, each of the many small parallel
regions of a LoRA step waits at its barrier for a descheduled thread: on this project's 2-core
box at load 15-22, 2 threads ran 2.9-8.5x slower per token than 1 (bench/README.md, "Training
benchmark"); on the same box quiet, 2 threads are the faster choice. No static number is right
for both, so the trainer measures.

How (`ThreadTuner`, pure, clock injected; `ThreadTuningCallback` drives it from Trainer):

    ladder    n, n/2, ..., 1              n = torch's count when training starts
    window    WINDOW_STEPS optimizer steps (and >= WINDOW_SECONDS) at one count; seconds
              per token = sum(step seconds) / sum(tokens), tokens = the collator's (real,
              padding included) tokens, since steps vary in length
    warm-up   the first step of the run and the first after every change are not counted
    round     hill-climb on the ladder from the fastest count measured so far, more threads
              first: the first round measures n/2 (from the run's first step, its warm-up),
              then n, then on down while each count is the fastest; a later round measures
              the chosen count, then its neighbours. A count already ABORT_RATIO x as slow
              as the fastest one (its warm-up step included) is dropped at once, mid-step
              if need be (`deadline`: the rest of that step runs on the fastest count), so on
              a busy box a probe of more threads costs ABORT_RATIO steps' time at most
    decision  switch only if the chosen count takes >= 1 + SWITCH_MARGIN as long per token
              as the fastest one measured in the round (noise must not flip it)
    re-probe  after REPROBE_MIN_STEPS steps and REPROBE_SECONDS of training, or longer so
              that a round's cost (what its slower steps lost against the chosen count) stays
              under PROBE_BUDGET of the time; sooner (after REPROBE_MIN_STEPS) when the
              chosen count became DEGRADED_RATIO x as slow as measured: load arrived

Each switch is reported as a "warning" event (the job's event log; the CLI prints it), e.g.
"threads 2 -> 1: 2 threads took 3.1x as long per token as 1".

When it runs: only where switched on (THREAD_TUNING_ENV=on; the worker sets it from
`Settings.trainer_thread_tuning`, off by default), on CPU training (no CUDA), one process
(WORLD_SIZE 1), more than one thread at the start, and the count not pinned (OMP_NUM_THREADS
set in the trainer's environment: the worker sets it from `Settings.trainer_threads`).
Why off by default: on a quiet 2-core machine, where 2 threads train 1.7x faster than 1, the
tuner measured its first steps on 2 threads (after 1) as slower and kept 1 thread: 0.59-0.61x
of torch's default (bench/README.md, "Thread count by measurement"); beside busy neighbours it
reached 0.92x of the best pinned count and 4.2-6.3x of 2 threads. The forked trainers of the
pre-warmed zygote see the same inputs as a cold one: the worker's trainer environment, and
torch's default count (the zygote runs no torch op before it forks).

Reproducibility: with the tuner, a rerun of the same spec reproduces its losses within float
tolerance, not bit for bit: when the count changes depends on timing, and the thread count
changes the order of some reductions. Pinning (`trainer_threads`, OMP_NUM_THREADS) gives
bit-identical reruns; the test suite turns the tuner off (tests/conftest.py).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

__all__ = [
    "THREAD_TUNING_ENV",
    "ThreadSwitch",
    "ThreadTuner",
    "ThreadTuningCallback",
    "thread_tuning_callback",
    "tuning_off_reason",
]

THREAD_TUNING_ENV = "LORAJOBS_THREAD_TUNING"  # "on" (or 1/true/yes) enables the tuner
ON_VALUES = frozenset({"on", "1", "true", "yes"})
# 3 counted steps per count: the counts this is for differ by 1.5-8x per token (bench/README),
# far beyond step-to-step noise; more steps would only make a wrong count cost more.
WINDOW_STEPS = 3
WINDOW_SECONDS = 1.0  # tiny steps (ms) are mostly timer and scheduler noise: take more of them
SWITCH_MARGIN = 0.10  # the chosen count must be >= 10% slower per token to be left
ABORT_RATIO = 1.5  # a count this much slower than the best one cannot win: stop measuring it
DEGRADED_RATIO = 1.5  # the chosen count got this much slower than measured: probe again
REPROBE_MIN_STEPS = 20
REPROBE_SECONDS = 120.0
PROBE_BUDGET = 0.05  # a round's lost time over the steady time before the next round
REPORT_EVENT = "warning"  # the one event type the worker logs that carries a free message


@dataclass(frozen=True)
class ThreadSwitch:
    """A decision to change the chosen count: `ratio` = seconds per token at `old` / at `new`."""

    old: int
    new: int
    ratio: float
    at_least: bool = False  # `old` was cut short: its step would have taken longer still

    def message(self) -> str:
        def threads(n: int) -> str:
            return f"{n} thread{'s' if n != 1 else ''}"

        return (f"threads {self.old} -> {self.new}: {threads(self.old)} took "
                f"{'over ' if self.at_least else ''}{self.ratio:.1f}x as long per token as "
                f"{self.new}")


@dataclass
class _Window:
    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds += seconds
        self.tokens += tokens
        self.steps += 1

    @property
    def rate(self) -> float:
        """Seconds per token (inf before any token)."""
        return self.seconds / self.tokens if self.tokens else math.inf


@dataclass
class _Round:
    """One probe round: seconds per token by count, and every step it ran (count, s, tokens)."""

    rates: dict[int, float] = field(default_factory=dict)
    window: _Window = field(default_factory=_Window)  # the count running now, counted steps
    steps: list[tuple[int, float, int]] = field(default_factory=list)
    cut: set[int] = field(default_factory=set)  # counts whose rate is a cut-short lower bound


class ThreadTuner:
    """The decision logic, without torch: it reads the injected clock; the caller runs the
    steps and sets the thread count.

    Per optimizer step: run it on `self.threads` threads between `begin_step()` and
    `end_step(tokens)`; end_step returns a ThreadSwitch when the chosen count changed.
    `threads` is the count for the next step (during a round it may differ from `chosen`).
    """

    def __init__(
        self, max_threads: int, *, clock: Callable[[], float] = time.monotonic,
        window_steps: int = WINDOW_STEPS, window_seconds: float = WINDOW_SECONDS,
        margin: float = SWITCH_MARGIN, abort_ratio: float = ABORT_RATIO,
        degraded_ratio: float = DEGRADED_RATIO, reprobe_min_steps: int = REPROBE_MIN_STEPS,
        reprobe_seconds: float = REPROBE_SECONDS, probe_budget: float = PROBE_BUDGET,
    ) -> None:
        if max_threads < 2:
            raise ValueError(f"max_threads must be >= 2 to have a choice, got {max_threads}")
        self.max_threads = max_threads
        self.ladder = _ladder(max_threads)
        self.clock = clock
        self.window_steps, self.window_seconds = window_steps, window_seconds
        self.margin, self.abort_ratio, self.degraded_ratio = margin, abort_ratio, degraded_ratio
        self.reprobe_min_steps, self.reprobe_seconds = reprobe_min_steps, reprobe_seconds
        self.probe_budget = probe_budget
        self.chosen = max_threads
        self.chosen_rate = math.inf  # seconds per token of `chosen`, as its last round measured
        self.switches: list[ThreadSwitch] = []
        # The first round starts one rung below n, on the run's first step (warm-up whatever
        # count runs it): on a busy machine n is the count that costs, and measured second the
        # abort drops it after one step.
        self.threads = self.ladder[1]
        self._warm_up = True
        self._first_step = True
        self._round: _Round | None = _Round()
        self._steady = _Window()
        self._recent: deque[tuple[float, int]] = deque(maxlen=window_steps)
        self._wait_seconds = reprobe_seconds
        self._t0: float | None = None
        self._step_tokens = 0
        self.fallback = self.threads

    @property
    def probing(self) -> bool:
        return self._round is not None

    def begin_step(self, tokens: int = 0) -> None:
        """`tokens`: the step's tokens, where known before it runs (Trainer batches a whole
        step first); they let a probe that is already too slow be cut short (`deadline`)."""
        self._t0 = self.clock()
        self._step_tokens = tokens

    def deadline(self) -> float | None:
        """Clock time past which the running step proves its count too slow, or None: a count
        being probed after a faster one was measured takes ABORT_RATIO x that one's time for
        these tokens at most. Past it, the caller runs the rest of the step on `fallback`
        and calls `cut_short`: on a busy box a probe of more threads then costs ABORT_RATIO
        steps at most, not the 10-20x a whole step on them can take."""
        rnd = self._round
        if (rnd is None or self._t0 is None or self._first_step or self._step_tokens <= 0
                or not rnd.rates or self.threads in rnd.rates):
            return None
        return self._t0 + self.abort_ratio * self._step_tokens * min(rnd.rates.values())

    def cut_short(self) -> ThreadSwitch | None:
        """The running step passed `deadline()`: record its count as too slow and move on, as
        end_step would have; that step's end_step is then ignored. `fallback`: the fastest
        count measured, for the rest of the step; `threads`: the next step's."""
        rnd = self._round
        assert rnd is not None and self._t0 is not None and self._step_tokens > 0
        seconds, self._t0 = self.clock() - self._t0, None
        rnd.steps.append((self.threads, seconds, self._step_tokens))
        rnd.rates[self.threads] = seconds / self._step_tokens
        rnd.cut.add(self.threads)
        self.fallback = min(rnd.rates, key=rnd.rates.__getitem__)
        self._first_step = False
        return self._next_count()

    def end_step(self, tokens: int) -> ThreadSwitch | None:
        """Account one step of `tokens` tokens, run on `threads` as it was at begin_step."""
        if self._t0 is None:  # cut short (or never begun): already accounted
            return None
        seconds, self._t0 = self.clock() - self._t0, None
        warm_up, self._warm_up = self._warm_up, False
        first, self._first_step = self._first_step, False
        if tokens <= 0 or seconds <= 0 or first:
            return None
        if self._round is None:
            self._account_steady(seconds, tokens, warm_up)
            return None
        return self._account_probe(seconds, tokens, warm_up)

    # -- steady: the chosen count runs; decide when to measure again

    def _account_steady(self, seconds: float, tokens: int, warm_up: bool) -> None:
        self._steady.add(seconds, tokens)
        if not warm_up:
            self._recent.append((seconds, tokens))
        if self._steady.steps < self.reprobe_min_steps:
            return
        recent = sum(s for s, _ in self._recent) / max(1, sum(t for _, t in self._recent))
        degraded = (len(self._recent) == self.window_steps
                    and recent >= self.degraded_ratio * self.chosen_rate)
        if degraded or self._steady.seconds >= self._wait_seconds:
            self._round = _Round()  # the chosen count first: no change, so no warm-up

    # -- a probe round

    def _account_probe(self, seconds: float, tokens: int, warm_up: bool) -> ThreadSwitch | None:
        rnd = self._round
        assert rnd is not None
        rnd.steps.append((self.threads, seconds, tokens))
        too_slow = self.abort_ratio * min(rnd.rates.values(), default=math.inf)
        if warm_up:  # not counted, but proof enough that this count cannot win
            if seconds / tokens >= too_slow:
                rnd.rates[self.threads] = seconds / tokens
                return self._next_count()
            return None
        w = rnd.window
        w.add(seconds, tokens)
        if w.rate >= too_slow or (w.steps >= self.window_steps
                                  and w.seconds >= self.window_seconds):
            rnd.rates[self.threads] = w.rate
            return self._next_count()
        return None

    def _next_count(self) -> ThreadSwitch | None:
        """Hill-climb: run an unmeasured neighbour of the fastest count so far (more threads
        first), or end the round."""
        rnd = self._round
        assert rnd is not None
        rnd.window = _Window()
        fastest = min(rnd.rates, key=rnd.rates.__getitem__)
        i = self.ladder.index(fastest)
        for j in (i - 1, i + 1):  # the ladder runs from n down to 1: i - 1 has more threads
            if 0 <= j < len(self.ladder) and self.ladder[j] not in rnd.rates:
                self._run_on(self.ladder[j])
                return None
        return self._end_round(fastest)

    def _end_round(self, fastest: int) -> ThreadSwitch | None:
        rnd = self._round
        assert rnd is not None
        old = self.chosen
        old_rate = rnd.rates.get(old, math.inf)
        switch = None
        if fastest != old and old_rate >= (1 + self.margin) * rnd.rates[fastest]:
            switch = ThreadSwitch(old, fastest, old_rate / rnd.rates[fastest],
                                  at_least=old in rnd.cut)
            self.switches.append(switch)
            self.chosen = fastest
        self.chosen_rate = rnd.rates[self.chosen]
        # What the round's steps on other counts cost beyond the chosen count's rate: the
        # next round waits until that is at most PROBE_BUDGET of the time trained since.
        lost = sum(max(0.0, s - t * self.chosen_rate) for n, s, t in rnd.steps
                   if n != self.chosen)
        self._wait_seconds = max(self.reprobe_seconds, lost / self.probe_budget)
        self._round = None
        self._steady = _Window()
        self._recent.clear()
        self._run_on(self.chosen)
        return switch

    def _run_on(self, threads: int) -> None:
        if threads != self.threads:
            self.threads = threads
            self._warm_up = True


def _ladder(n: int) -> list[int]:
    """n, n/2, ..., 1 (integer halving): 2 -> [2, 1]; 12 -> [12, 6, 3, 1]."""
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def tuning_off_reason(env: Mapping[str, str], *, cuda: bool, world_size: int,
                      threads: int) -> str | None:
    """Why the tuner must not run here, or None: it runs. Off unless THREAD_TUNING_ENV is on
    (Settings.trainer_thread_tuning): on a quiet machine it measured 0.59-0.61x of torch's
    default count (bench/README.md), so it is for workers on oversubscribed machines."""
    if env.get(THREAD_TUNING_ENV, "").strip().lower() not in ON_VALUES:
        return f"{THREAD_TUNING_ENV} is not on (off by default)"
    if env.get("OMP_NUM_THREADS", "").strip():
        return f"pinned: OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if cuda:
        return "CUDA training"
    if world_size > 1:
        return f"{world_size} processes"
    if threads < 2:
        return f"{threads} thread"
    return None


class ThreadTuningCallback(TrainerCallback):
    """Times each optimizer step, feeds the tuner, applies its count with torch.set_num_threads;
    restores the starting count when training ends (train() may run inside a caller's process).

    During a probe step that can be cut short, hooks on the trainable (LoRA) modules' forward
    and their parameters' gradients check the tuner's deadline, so a count that is already too
    slow gives way mid-step (OpenMP's count is the calling thread's: the hooks run on the
    training thread, forward and CPU backward alike).
    """

    def __init__(self, tuner: ThreadTuner, token_counter: Callable[[], int],
                 emit: Callable[..., None]) -> None:
        self.tuner = tuner
        self.token_counter = token_counter
        self.emit = emit
        self._tokens = 0
        self._hooks: list[Any] = []
        self._deadline: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._tokens = self.token_counter()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer's eval batches go through the same collator, between two steps' counts
        self._tokens = self.token_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                      **kwargs: Any) -> None:
        import torch

        if torch.get_num_threads() != self.tuner.threads:
            torch.set_num_threads(self.tuner.threads)
        # Trainer collates all of a step's micro-batches before on_step_begin
        self.tuner.begin_step(self.token_counter() - self._tokens)
        self._deadline = self.tuner.deadline()
        if self._deadline is not None and model is not None:
            self._watch(model)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unwatch()
        tokens, self._tokens = self._tokens, self.token_counter()
        self._report(self.tuner.end_step(self._tokens - tokens))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        self._unwatch()
        torch.set_num_threads(self.tuner.max_threads)

    def check(self, *_: Any) -> None:
        """A hook: past the deadline, the rest of the step runs on the tuner's fallback."""
        if self._deadline is None or self.tuner.clock() < self._deadline:
            return
        import torch

        self._deadline = None  # once; the hooks stay until the step ends (removing a tensor
        switch = self.tuner.cut_short()  # hook while autograd iterates them is not allowed)
        torch.set_num_threads(self.tuner.fallback)
        self._report(switch)

    def _watch(self, model: Any) -> None:
        for module in model.modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if params:
                self._hooks.append(module.register_forward_hook(self.check))
                self._hooks.extend(p.register_hook(self.check) for p in params)

    def _unwatch(self) -> None:
        self._deadline = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _report(self, switch: ThreadSwitch | None) -> None:
        if switch is not None:
            self.emit(REPORT_EVENT, message=switch.message())


def thread_tuning_callback(token_counter: Callable[[], int], emit: Callable[..., None], *,
                           world_size: int) -> ThreadTuningCallback | None:
    """The tuner for this process, or None where it must not run (`tuning_off_reason`).
    `token_counter()`: tokens the collator has emitted so far (they grow by each step's)."""
    import torch

    threads = torch.get_num_threads()
    if tuning_off_reason(os.environ, cuda=torch.cuda.is_available(), world_size=world_size,
                         threads=threads) is not None:
        return None
    return ThreadTuningCallback(ThreadTuner(threads), token_counter, emit)
