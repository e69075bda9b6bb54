"""Pure renderers: API objects in, Kubernetes manifests (plain dicts) out. No I/O, no globals, no clock."""

from .inferenceservice import render_inferenceservice
from .settings import RenderSettings
from .trainingjob import render_trainingjob, trainer_config

__all__ = ["RenderSettings", "render_inferenceservice", "render_trainingjob", "trainer_config"]
