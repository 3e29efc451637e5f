"""dcgan_dist: distributed DCGAN training under HuggingFace Accelerate."""

__version__ = "0.1.0"
