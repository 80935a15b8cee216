"""alignctl: declarative, Hydra-driven alignment pipelines on top of TRL."""

__version__ = "0.1.0"
