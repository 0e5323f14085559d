"""syncd: mirror MongoDB collections into Chroma through change streams."""

__version__ = "0.1.0"
