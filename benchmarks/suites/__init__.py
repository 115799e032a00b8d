"""Benchmark suites. Each module defines ``cases(device, dtypes, quick) -> (cases, notes)``."""

from . import logprobs
from . import ensemble

SUITES = {
    "logprobs": logprobs,
    "ensemble": ensemble,
}
