def logprobs(*a, **k): raise NotImplementedError
