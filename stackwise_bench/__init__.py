"""stackwise_bench: Hydra-composed vision studies with a complete run record.

Importing the package is cheap on purpose: torch, timm and peft are imported by
the modules that need them, so `stackwise_bench.analysis` stays torch-free.
"""

__version__ = "0.1.0"
