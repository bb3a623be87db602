"""Multi-exit model families (PyTorch). This package's own import is torch-free."""

FAMILY_MODULES = ("msdnet", "espnetv2", "googlenet")  # modules whose @register_model builders form the registry
