"""fastattr runtime: which training images made this image, in milliseconds."""

__version__ = "0.1.0"
