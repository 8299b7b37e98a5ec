"""The compression report: quality, size and speed of every method on one model."""
