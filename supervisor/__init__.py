"""llama-supervisor: a supervisor for the llama.cpp inference server."""

from supervisor.errors import SupervisorError
from supervisor.policy import (
    LifecycleEvent,
    LifecycleState,
    Reason,
    Verdict,
)

__all__ = [
    "LifecycleEvent",
    "LifecycleState",
    "Reason",
    "SupervisorError",
    "Verdict",
]

__version__ = "0.1.0"
