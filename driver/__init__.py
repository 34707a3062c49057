"""qpi-driver: a QPU driver node bridging a QPI orchestrator to an executor."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qpi-driver")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
