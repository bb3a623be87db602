"""Multi-exit model families (PyTorch). This package's own import is torch-free."""

# modules whose @register_model builders form the registry (plug-ins add theirs: models/registry.py)
FAMILY_MODULES = ("msdnet", "espnetv2", "googlenet", "retrofit")
