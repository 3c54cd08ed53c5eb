"""Data sources: each turns a config into a list of RawTask. One file per source."""
