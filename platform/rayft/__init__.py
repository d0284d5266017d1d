"""rayft: Ray-native supervised fine-tuning. One YAML spec, any cluster size."""

__version__ = "0.1.0"
