"""The step contract: what one pipeline step is asked (the ``exec-node`` invocation, the
request), who it runs for (identity, orchestrator), how it runs (executor, hooks) and how it
fails (failures). Every target's steps run it; the project side uses only the invocation."""

from kvx_runtime.step.invocation import PROGRAM, ExecNodeInvocation, InvocationError, identity_args
from kvx_runtime.step.request import StepRequest, StepResult

__all__ = ["PROGRAM", "ExecNodeInvocation", "InvocationError", "StepRequest", "StepResult", "identity_args"]
