"""deit-serve: an inference HTTP service for DeiT image classifiers with dynamic batching."""

__version__ = "0.1.0"
