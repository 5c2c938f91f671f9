"""Timing: interleaved rounds, medians, and ratios taken round by round.

The machine a benchmark runs on is rarely quiet (other processes, frequency
changes, a shared CI box). Absolute times drift; ratios of measurements taken a
few milliseconds apart drift much less. So every candidate of a case (the
polycos subjects, the native peers and the parts of the machine floor) is
timed once per *round*, in a rotated order, and a ratio is the median over
rounds of the per-round quotient, never a quotient of separately taken medians.
The floor of a round is the fastest reader plus the fastest writer of that
round (:func:`floor_samples`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

try:  # POSIX: page-fault counts in the records
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "Timer",
    "Timing",
    "calibrate",
    "cpu_timer",
    "floor_samples",
    "interleaved",
    "median_ratio",
]

#: ``timer(fn, number)``: seconds per call, averaged over ``number`` back-to-back calls,
#: including whatever synchronisation makes the result ready.
Timer = Callable[[Callable[[], Any], int], float]


def cpu_timer(sync: Callable[[Any], Any] | None = None) -> Timer:
    """A wall-clock timer that waits for each result with ``sync(result)``.

    Parameters
    ----------
    sync : callable, optional
        Called on every result before the clock stops (for example
        ``jax.block_until_ready``). ``None`` for eager CPU libraries.

    Returns
    -------
    Timer
        ``timer(fn, number) -> seconds per call``.
    """

    def timer(fn: Callable[[], Any], number: int) -> float:
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn()
            if sync is not None:
                sync(out)
            del out  # freed before the next call, as the GPU timers' results are
        return (time.perf_counter() - t0) / number

    return timer


def calibrate(
    timer: Timer, fn: Callable[[], Any], min_time: float, max_number: int = 1000
) -> tuple[int, float]:
    """How many calls make one sample last at least ``min_time`` seconds.

    Parameters
    ----------
    timer : Timer
        The case's timer.
    fn : callable
        The candidate, already warmed up.
    min_time : float
        Target duration of one sample, in seconds.
    max_number : int, optional
        Upper bound on the calls per sample.

    Returns
    -------
    (int, float)
        Calls per sample, and the seconds per call of the calibration sample.
    """
    t = timer(fn, 1)
    if t <= 0:
        return max_number, t
    return max(1, min(max_number, math.ceil(min_time / t))), t


@dataclass
class Timing:
    """The samples of one candidate: seconds per call, one entry per round (``None`` if skipped)."""

    name: str
    number: int
    samples: list[float | None] = field(default_factory=list)
    #: minor page faults per call in each round it ran (``getrusage``; empty where unavailable)
    faults: list[float] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        """The rounds in which this candidate ran."""
        return [t for t in self.samples if t is not None]

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times)


def interleaved(
    timer: Timer | Mapping[str, Timer],
    fns: dict[str, Callable[[], Any]],
    numbers: dict[str, int],
    rounds: int,
    *,
    slow: float = 1.0,
    min_rounds_slow: int = 3,
    first: dict[str, float] | None = None,
) -> dict[str, Timing]:
    """Time every candidate once per round, rotating the order from round to round.

    Parameters
    ----------
    timer : Timer or mapping
        Measures one sample of ``number`` calls; or candidate name -> its timer.
    fns : dict
        Candidate name -> zero-argument callable (warmed up).
    numbers : dict
        Candidate name -> calls per sample (from :func:`calibrate`).
    rounds : int
        Number of rounds (samples per candidate).
    slow : float, optional
        A candidate whose calibration took longer than this many seconds per call
        is sampled in only the first ``min_rounds_slow`` rounds.
    min_rounds_slow : int, optional
        Rounds for slow candidates.
    first : dict, optional
        Candidate name -> seconds per call from calibration.

    Returns
    -------
    dict
        Candidate name -> :class:`Timing`.
    """
    names = list(fns)
    timers = timer if isinstance(timer, Mapping) else dict.fromkeys(names, timer)
    out = {n: Timing(n, numbers[n]) for n in names}
    first = first or {}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if first.get(name, 0.0) > slow and r >= min_rounds_slow:
                out[name].samples.append(None)
                continue
            f0 = _minor_faults()
            out[name].samples.append(timers[name](fns[name], numbers[name]))
            f1 = _minor_faults()
            if f0 is not None and f1 is not None:
                out[name].faults.append((f1 - f0) / numbers[name])
    return out


def _minor_faults() -> int | None:
    """This process's minor page faults so far (first touches of new memory); ``None`` without ``resource``."""
    if resource is None:  # pragma: no cover - Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def floor_samples(
    reads: Sequence[Sequence[float | None]], writes: Sequence[Sequence[float | None]]
) -> list[float | None]:
    """Per round: the fastest reader plus the fastest writer of that round.

    Parameters
    ----------
    reads, writes : sequence of per-round samples
        One sequence per library's stream operation (``None`` where it did not run).

    Returns
    -------
    list of float or None
        The floor of each round (``None`` when no reader or no writer ran in it).

    Examples
    --------
    >>> floor_samples([[2.0, 3.0], [1.5, None]], [[1.0, 1.0]])
    [2.5, 4.0]
    """
    rounds = max((len(s) for s in [*reads, *writes]), default=0)
    out: list[float | None] = []
    for r in range(rounds):
        rs = [s[r] for s in reads if r < len(s) and s[r] is not None]
        ws = [s[r] for s in writes if r < len(s) and s[r] is not None]
        out.append(min(rs) + min(ws) if rs and ws else None)  # type: ignore[type-var]
    return out


def median_ratio(num: Sequence[float | None], den: Sequence[float | None]) -> float:
    """Median over rounds of ``num[r] / den[r]`` (rounds where both ran).

    Parameters
    ----------
    num, den : sequence of float or None
        Per-round samples of two candidates of the same case.

    Returns
    -------
    float
        The median quotient, ``nan`` when no round has both.

    Examples
    --------
    >>> median_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 1.0])
    2.0
    >>> median_ratio([1.0, None], [None, 1.0])
    nan
    """
    qs = [
        a / b for a, b in zip(num, den, strict=False) if a is not None and b is not None and b > 0
    ]
    return statistics.median(qs) if qs else math.nan
