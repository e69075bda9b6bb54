"""aiaas: AI models as a service on Kubernetes."""

__version__ = "0.1.0"
