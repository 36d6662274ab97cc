"""Job configuration: dataclasses, TOML loading, CLI overrides."""

from torchtitan_lite.config.job_config import JobConfig
from torchtitan_lite.config.loader import help_text, load_config, parse_args, to_toml

__all__ = ["JobConfig", "help_text", "load_config", "parse_args", "to_toml"]
