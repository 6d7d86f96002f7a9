from torchtitan_rtpurbo.config.job_config import JobConfig
from torchtitan_rtpurbo.config.manager import ConfigError, load_job_config, load_toml

__all__ = ["JobConfig", "ConfigError", "load_job_config", "load_toml"]
