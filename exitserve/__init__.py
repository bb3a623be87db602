"""exitserve: adaptive early-exit inference server. The console entry point lives in ``exitserve.cli``."""

__version__ = "0.1.0"
