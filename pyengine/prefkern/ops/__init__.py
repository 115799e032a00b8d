"""Op registration: one module per op, each registering ``prefkern::<op>`` custom ops with their
fake (meta) implementation and autograd, and dispatching to the backend chosen by ``prefkern.dispatch``."""
