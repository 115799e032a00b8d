"""Benchmark suites. Each module defines ``DEFAULT_DTYPES`` ({device type: [dtype]}) and
``cases(device, dtypes, quick) -> (cases, notes)``."""

from . import ensemble, logprobs, preference, sampling

SUITES = {
    "logprobs": logprobs,
    "preference": preference,
    "ensemble": ensemble,
    "sampling": sampling,
}
