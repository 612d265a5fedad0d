"""The step contract: what one pipeline step is asked (the ``exec-node`` invocation, the
request), how it runs and how it fails. Every target's steps run it."""

from kvx_runtime.step.invocation import PROGRAM, ExecNodeInvocation, InvocationError, identity_args

__all__ = ["PROGRAM", "ExecNodeInvocation", "InvocationError", "identity_args"]
