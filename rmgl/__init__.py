"""rmgl: receptive multi-granularity learning for person re-identification."""

__version__ = "0.1.0"
