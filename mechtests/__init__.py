"""mechtests: research findings about transformer language models, as a pytest suite."""

__version__ = "0.1.0"
