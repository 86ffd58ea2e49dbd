"""The statistics of the sandbox comparison (docs/sandbox-protocol.md): a paired difference between
two methods run with the same seeds, its 95 % interval, and the pre-registered decision rule."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any


def _half_width(values: list[float], level: float) -> float:
    """Half the Student-t interval of the mean of ``values`` at ``level``."""
    from scipy import stats

    t = float(stats.t.ppf(0.5 + level / 2, len(values) - 1))
    return t * statistics.stdev(values) / math.sqrt(len(values))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> dict[str, Any]:
    """``a`` minus ``b`` over the seeds both have: per-seed differences, their mean, standard
    deviation, Student-t interval at ``level``, and the mean difference relative to ``b``'s mean."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"a paired interval needs at least 2 common seeds, got {seeds}")
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs)
    half = _half_width(diffs, level)
    b_mean = statistics.mean(b[s] for s in seeds)
    return {
        "seeds": seeds,
        "differences": [round(d, 4) for d in diffs],
        "mean": round(mean, 4),
        "sd": round(sd, 4),
        "ci": [round(mean - half, 4), round(mean + half, 4)],
        "level": level,
        "relative": round(mean / b_mean, 4) if b_mean else None,
        "relative_ci": [round((mean - half) / b_mean, 4), round((mean + half) / b_mean, 4)] if b_mean else None,
    }


def mean_interval(values: list[float], level: float = 0.95) -> list[float]:
    """The Student-t interval of the mean of ``values`` at ``level``."""
    mean, half = statistics.mean(values), _half_width(values, level)
    return [round(mean - half, 4), round(mean + half, 4)]


def decide(diff: Mapping[str, Any], first: str = "ICSD", second: str = "uni-context") -> str:
    """The protocol's rule: ``first`` wins when the whole interval is above 0, loses when it is
    below, and otherwise the comparison shows no difference."""
    lo, hi = diff["ci"]
    if lo > 0:
        return f"{first} better"
    if hi < 0:
        return f"{second} better"
    return "no difference shown"
