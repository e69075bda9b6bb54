"""Pure renderers: API objects in, Kubernetes manifests (plain dicts) out. No I/O, no globals, no clock."""

from .inferenceservice import ServicePlan, render_inferenceservice
from .settings import RenderSettings
from .trainingjob import JobPlan, render_trainingjob, trainer_config

__all__ = ["JobPlan", "RenderSettings", "ServicePlan", "render_inferenceservice", "render_trainingjob",
           "trainer_config"]
