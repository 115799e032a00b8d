"""Benchmark suites. Each module defines ``DEFAULT_DTYPES`` ({device type: [dtype]}) and
``cases(device, dtypes, quick) -> (cases, notes)``."""

from . import distributed, ensemble, logprobs, preference, sampling

SUITES = {
    "logprobs": logprobs,
    "preference": preference,
    "ensemble": ensemble,
    "sampling": sampling,
    "distributed": distributed,
}
