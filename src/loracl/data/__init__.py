"""Tasks and streams: what a continual learner sees, built from pluggable sources."""

from loracl.data.build import load_stream
from loracl.data.stream import RawTask, Split, Stream, Task, build_stream

__all__ = ["RawTask", "Split", "Stream", "Task", "build_stream", "load_stream"]
