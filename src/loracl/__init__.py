"""loracl: continual learning and adapter fusion with LoRA-family methods on Hugging Face models."""

from loracl.errors import ConfigError, DataError, LoraclError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "LoraclError", "__version__"]
