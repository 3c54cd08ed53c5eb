"""Files shipped inside the package: the quickstart config and its small text stream."""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).parent


def quickstart_data_dir() -> Path:
    """The embedded json_dir root of the quickstart stream (see quickstart/SOURCE.md)."""
    return RESOURCES / "quickstart"


def instruct_data_dir() -> Path:
    """The embedded json_dir root of the instruction-tuning stream (see instruct/SOURCE.md)."""
    return RESOURCES / "instruct"


def quickstart_config_text() -> str:
    """The YAML of the embedded default run (`loracl run` with no config)."""
    return (RESOURCES / "quickstart.yaml").read_text(encoding="utf-8")
