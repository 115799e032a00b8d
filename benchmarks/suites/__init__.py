"""Benchmark suites. Each module defines ``cases(device, dtypes, quick) -> (cases, notes)``."""

from . import logprobs

SUITES = {
    "logprobs": logprobs,
}
