"""Benchmark suites. Each module defines ``cases(device, dtypes, quick) -> (cases, notes)``."""

from . import logprobs
from . import sampling  # sampling (issue #6)

SUITES = {
    "logprobs": logprobs,
    "sampling": sampling,  # sampling (issue #6)
}
