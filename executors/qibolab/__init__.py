"""The `qibolab` executor: QPUs (and qibolab's emulator) through qibolab's
vendor-neutral control stack. Needs the `hardware` extra."""

from executors.qibolab.executor import QibolabExecutor

__all__ = ["QibolabExecutor"]
