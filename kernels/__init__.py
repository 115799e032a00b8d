"""Triton kernels of prefkern, one kernel family per module, each with its host launcher.

No autograd here: ``prefkern.ops`` wraps these launchers. Every module lists the kernels it defines
in ``TRITON_KERNELS`` (name -> (jitted kernel, signature, constexprs)) so that the test suite can
compile each one for real GPU targets on a machine without a GPU.
"""
