"""Error types: a LoraclError is bad user input, reported in one line (CLI exit code 2)."""


class LoraclError(Exception):
    """Bad input from the user: a config key, a path, a label, a checkpoint. One clear message."""


class ConfigError(LoraclError):
    """A config key is unknown, mistyped or out of range."""


class DataError(LoraclError):
    """A data source is missing, empty or malformed."""


class CheckpointError(LoraclError):
    """A checkpoint folder does not belong to this run or cannot be read."""


class MissingDependencyError(LoraclError):
    """An optional package is needed for what the user asked for."""
