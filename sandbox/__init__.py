"""r1lab sandbox: isolated, killable, parallel execution of model-written Python programs."""
from sandbox.caps import Capabilities, SandboxUnavailable, capabilities
from sandbox.runner import STATUSES, ExecResult, Limits, Sandbox, TestsResult, default_sandbox, run

__all__ = ["run", "ExecResult", "TestsResult", "Sandbox", "Limits", "STATUSES", "capabilities", "Capabilities",
           "SandboxUnavailable", "default_sandbox"]
