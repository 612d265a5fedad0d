"""The step cache: keys over everything that can change a step's outputs (:mod:`.key`)."""

from kvx_runtime.cache.key import KeyContext, StepKey, step_keys

__all__ = ["KeyContext", "StepKey", "step_keys"]
