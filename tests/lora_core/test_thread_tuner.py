"""The CPU thread tuner: decisions on a fake clock, when it runs at all, one real train()."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_core.training import thread_tuner as tt
from lora_core.training.thread_tuner import ThreadSwitch, ThreadTuner, tuning_off_reason

QUIET = {2: 1.0, 1: 1.7}  # seconds per 1000 tokens by thread count: 2 threads win
BUSY = {2: 8.0, 1: 2.0}  # oversubscribed: every barrier waits for a descheduled thread


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(tuner: ThreadTuner, clock: FakeClock, steps: int,
        rate: Callable[[int, int], float], seed: int = 0) -> list[int]:
    """Drive `steps` steps of 500-1500 tokens; a step on n threads takes rate(step, n) s per
    1000 tokens, +-10%; past the tuner's deadline the rest of it runs on `fallback`, as
    ThreadTuningCallback does. Returns the count each step started on."""
    rng = random.Random(seed)
    ran = []
    for i in range(steps):
        tokens = rng.randint(500, 1500)
        ran.append(tuner.threads)
        tuner.begin_step(tokens)
        deadline, start = tuner.deadline(), clock.now
        seconds = rate(i, tuner.threads) * tokens / 1000 * rng.uniform(0.9, 1.1)
        if deadline is not None and start + seconds > deadline:
            clock.now = deadline
            tuner.cut_short()
            left = 1 - (deadline - start) / seconds
            seconds = left * rate(i, tuner.fallback) * tokens / 1000
        clock.now += seconds
        tuner.end_step(tokens)
        assert tuner.threads in tuner.ladder
    return ran


def fixed(rates: dict[int, float]) -> Callable[[int, int], float]:
    return lambda i, n: rates[n]


def test_goes_down_when_fewer_threads_are_faster() -> None:
    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock)
    ran = run(tuner, clock, 40, fixed(BUSY))
    assert tuner.chosen == 1 and tuner.threads == 1
    [switch] = tuner.switches
    assert (switch.old, switch.new) == (2, 1) and switch.at_least
    assert switch.ratio == pytest.approx(tt.ABORT_RATIO, rel=0.2)
    assert switch.message().startswith("threads 2 -> 1: 2 threads took over 1.")
    # 1 thread is measured first (from the run's first step); 2 threads are dropped during
    # their warm-up step, 4x as slow: the busy box pays for 1.5 steps' time there, not 4
    assert ran[:6] == [1, 1, 1, 1, 2, 1] and ran.count(2) == 1


def test_a_probe_is_cut_short_once_it_is_too_slow() -> None:
    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock)
    for _ in range(4):  # the run's first step, then 3 counted steps on 1 thread at 2 s each
        assert tuner.threads == 1
        tuner.begin_step(1000)
        assert tuner.deadline() is None  # nothing faster measured yet: nothing to cut
        clock.now += 2.0
        tuner.end_step(1000)
    assert tuner.threads == 2  # the probe of 2 threads
    tuner.begin_step(1000)
    assert tuner.deadline() == pytest.approx(clock.now + tt.ABORT_RATIO * 2.0)
    clock.now += tt.ABORT_RATIO * 2.0
    switch = tuner.cut_short()
    assert switch is not None and (switch.old, switch.new) == (2, 1)
    assert tuner.fallback == 1 and tuner.threads == 1
    clock.now += 20.0  # the rest of the step, whatever it took, is not measured
    assert tuner.end_step(1000) is None and tuner.chosen_rate == pytest.approx(2.0 / 1000)
    tuner.begin_step(1000)
    assert tuner.deadline() is None  # steady: no probe


def test_stays_when_fewer_threads_are_not_faster() -> None:
    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock)
    ran = run(tuner, clock, 40, fixed(QUIET))
    assert tuner.chosen == 2 and tuner.threads == 2 and not tuner.switches
    assert ran.count(1) == 4  # the first round's warm-up + 3 counted steps, then 2 for good
    assert set(ran[4:]) == {2}


@pytest.mark.parametrize(("one_thread", "switches"), [(0.95, False), (0.85, True)])
def test_switch_needs_the_margin(one_thread: float, switches: bool) -> None:
    clock = FakeClock()  # no noise: 1 thread 5% / 15% faster than 2; margin 10%
    tuner = ThreadTuner(2, clock=clock, margin=0.10)
    for _ in range(12):
        tuner.begin_step()
        clock.now += {2: 1.0, 1: one_thread}[tuner.threads]
        tuner.end_step(1000)
    assert tuner.chosen == (1 if switches else 2)
    assert len(tuner.switches) == int(switches)


def test_reprobes_and_goes_back_up_when_the_box_goes_quiet() -> None:
    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock, reprobe_seconds=60.0)
    run(tuner, clock, 8, fixed(BUSY))  # the first round ends at step 5: ~6 s steady
    assert tuner.chosen == 1
    quiet_from = clock.now
    ran = run(tuner, clock, 200, fixed(QUIET), seed=1)
    assert [(s.old, s.new) for s in tuner.switches] == [(2, 1), (1, 2)]
    # later rounds try 1 thread again: one warm-up step, dropped at 1.7x
    assert tuner.chosen == 2 and ran[-50:].count(1) <= 1
    # the periodic round, not sooner: at least reprobe_seconds of steady training first
    first_on_two = ran.index(2)
    assert first_on_two >= (60 - 8) / QUIET[1] and clock.now - quiet_from > 60


def test_load_arriving_triggers_a_round_before_the_period() -> None:
    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock, reprobe_seconds=10_000.0)
    run(tuner, clock, 40, fixed(QUIET))
    assert tuner.chosen == 2
    ran = run(tuner, clock, 40, fixed(BUSY), seed=2)
    assert tuner.chosen == 1 and [(s.old, s.new) for s in tuner.switches] == [(2, 1)]
    # the chosen count 1.5x as slow as measured: a round after REPROBE_MIN_STEPS, far sooner
    # than 10,000 s
    assert ran.index(1) <= tt.REPROBE_MIN_STEPS + tt.WINDOW_STEPS + 2


def test_reprobes_are_spaced_by_what_they_cost() -> None:
    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock, reprobe_seconds=10.0, probe_budget=0.01)
    ran = run(tuner, clock, 400, fixed(BUSY))
    assert tuner.chosen == 1 and len(tuner.switches) == 1
    # each later round loses ~1 s (a probe of 2 threads cut at 1.5x a 2 s step), so at a 1%
    # budget rounds come every ~100 s of training (~50 steps at 2 s), not every 10 s
    on_two = ran.count(2)
    assert 4 <= on_two <= 10
    lost = (tt.ABORT_RATIO - 1) * BUSY[1] * on_two
    assert lost < 0.02 * clock.now


def test_ladder_never_goes_below_one_or_above_the_start() -> None:
    assert tt._ladder(2) == [2, 1] and tt._ladder(12) == [12, 6, 3, 1] and tt._ladder(1) == [1]
    clock = FakeClock()
    tuner = ThreadTuner(16, clock=clock)
    ran = run(tuner, clock, 60, fixed({16: 8.0, 8: 4.0, 4: 2.0, 2: 1.5, 1: 1.2}))
    assert tuner.chosen == 1 and min(ran) == 1 and max(ran) == 16
    assert [(s.old, s.new) for s in tuner.switches] == [(16, 1)]
    # a middle count wins when it is the fastest: the climb stops where it got slower
    clock = FakeClock()
    tuner = ThreadTuner(16, clock=clock)
    ran = run(tuner, clock, 60, fixed({16: 3.0, 8: 2.0, 4: 1.0, 2: 1.6, 1: 3.0}))
    assert tuner.chosen == 4 and 1 not in ran
    with pytest.raises(ValueError, match="max_threads"):
        ThreadTuner(1)


def test_message_names_the_counts() -> None:
    assert ThreadSwitch(1, 2, 1.73).message() == \
        "threads 1 -> 2: 1 thread took 1.7x as long per token as 2"


ON = {tt.THREAD_TUNING_ENV: "on"}


@pytest.mark.parametrize(("env", "cuda", "world", "threads", "reason"), [
    (ON, False, 1, 2, None),
    ({tt.THREAD_TUNING_ENV: "1"}, False, 1, 2, None),
    ({**ON, "OPENBLAS_NUM_THREADS": "1"}, False, 1, 2, None),  # the worker's fork-safety one
    ({**ON, "OMP_NUM_THREADS": "2"}, False, 1, 2, "pinned"),
    ({}, False, 1, 2, "off by default"),
    ({tt.THREAD_TUNING_ENV: "off"}, False, 1, 2, "off by default"),
    ({**ON}, True, 1, 2, "CUDA"),
    ({**ON}, False, 2, 2, "processes"),
    ({**ON}, False, 1, 1, "1 thread"),
])
def test_when_it_runs(env: dict[str, str], cuda: bool, world: int, threads: int,
                      reason: str | None) -> None:
    got = tuning_off_reason(env, cuda=cuda, world_size=world, threads=threads)
    assert got is None if reason is None else reason in (got or "")


def test_real_train_runs_it_and_restores_the_thread_count(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from lora_core.spec import RunSpec
    from lora_core.training.trainer import train

    monkeypatch.setenv(tt.THREAD_TUNING_ENV, "on")  # off by default (tests/conftest.py too)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tuners: list[ThreadTuner] = []
    seen: list[tuple[int, int]] = []  # (count torch ran the step on, count the tuner asked)

    class Recorded(ThreadTuner):
        def __init__(self, max_threads: int) -> None:
            # tiny steps take milliseconds: count them without a minimum duration
            super().__init__(max_threads, window_seconds=0.0)
            tuners.append(self)

        def begin_step(self, tokens: int = 0) -> None:
            seen.append((torch.get_num_threads(), self.threads))
            super().begin_step(tokens)

    monkeypatch.setattr(tt, "ThreadTuner", Recorded)
    from lora_core.data.synthetic import make_examples

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_examples(40, seed=2)))
    spec = RunSpec(model_dir=tiny_model_dir, train_file=data, output_dir=tmp_path / "out",
                   lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, merge="none",
                   training={"max_steps": 12, "batch_size": 4, "max_seq_length": 128})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train(spec)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert result.status == "completed" and result.global_step == 12
    [tuner] = tuners
    assert tuner.max_threads == 2 and len(seen) == 12
    assert all(ran == asked for ran, asked in seen)  # each step ran on the count asked for
    assert {asked for _, asked in seen} == {1, 2}  # the first round measured both
    assert tuner.chosen_rate < float("inf")  # ... and ended: a decision was made
    assert after == 2  # the starting count is back once training ends


def test_callback_applies_the_count_reports_switches_and_restores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock)
    events: list[tuple[str, dict]] = []
    counter = [0]
    callback = tt.ThreadTuningCallback(tuner, lambda: counter[0],
                                       lambda type_, **f: events.append((type_, f)))
    fed: list[int] = []
    end_step = tuner.end_step
    monkeypatch.setattr(tuner, "end_step", lambda tokens: fed.append(tokens) or end_step(tokens))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        callback.on_train_begin(None, None, None)
        for _ in range(8):
            callback.on_step_begin(None, None, None)
            assert torch.get_num_threads() == tuner.threads
            clock.now += BUSY[tuner.threads]
            counter[0] += 1000
            callback.on_step_end(None, None, None)
            counter[0] += 300  # an evaluation's batches, through the same collator
            callback.on_evaluate(None, None, None)
        callback.on_train_end(None, None, None)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert events == [("warning", {"message": "threads 2 -> 1: 2 threads took 4.0x as long "
                                              "per token as 1"})]
    assert fed == [1000] * 8 and after == 2


def test_callback_cuts_a_slow_probe_from_inside_the_step() -> None:
    import torch

    clock = FakeClock()
    tuner = ThreadTuner(2, clock=clock)
    for _ in range(4):  # the run's first step, then 1 thread measured at 2 s per 1000 tokens
        tuner.begin_step(1000)
        clock.now += 2.0
        tuner.end_step(1000)
    assert tuner.threads == 2
    events: list[tuple[str, dict]] = []
    counter = [1000]  # the step's batches, collated before on_step_begin
    callback = tt.ThreadTuningCallback(tuner, lambda: counter[0],
                                       lambda type_, **f: events.append((type_, f)))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # frozen: hooks go where trainable parameters are
    before = torch.get_num_threads()
    try:
        callback.on_step_begin(None, None, None, model=model)
        assert torch.get_num_threads() == 2 and callback._hooks
        clock.now += 4.0  # past the deadline (1.5 x 2 s) before the forward pass
        model(torch.ones(3, 4)).sum().backward()
        assert torch.get_num_threads() == 1  # the rest of the step ran on the fallback
        callback.on_step_end(None, None, None)
        assert not callback._hooks and not model[2]._forward_hooks
        assert not model[2].weight._backward_hooks  # the gradient hooks too
    finally:
        torch.set_num_threads(before)
    assert events == [("warning", {"message": "threads 2 -> 1: 2 threads took over 2.0x as "
                                              "long per token as 1"})]
    assert tuner.chosen == 1 and tuner.threads == 1
