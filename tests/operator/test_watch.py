"""The kopf wiring's settings (operator/watch.py): what the operator asks the API server to send it."""

from __future__ import annotations

import kopf

from aiaas.contract import launch
from aiaas.operator.reconcile_inferenceservice import InferenceServiceReconciler
from aiaas.operator.reconcile_trainingjob import TrainingJobReconciler
from aiaas.operator.reconciler import ChildWatch, slim_resource
from aiaas.operator.watch import child_selectors, kopf_settings


def test_children_are_listed_and_watched_by_their_owner_label_on_the_server():
    """Only our children's events come: not every pod of the cluster, filtered afterwards."""
    settings = kopf_settings([*TrainingJobReconciler.children, *InferenceServiceReconciler.children])
    selectors = settings.watching.label_selectors
    assert selectors.collect(kopf.Resource("", "v1", "pods")) == [launch.LABEL_JOB]
    assert selectors.collect(kopf.Resource("apps", "v1", "statefulsets")) == [launch.LABEL_JOB]
    assert selectors.collect(kopf.Resource("apps", "v1", "deployments")) == [launch.LABEL_ISVC]
    assert selectors.collect(kopf.Resource("aiaas.dev", "v1alpha1", "trainingjobs")) == [], "our own kinds: all"
    assert not settings.posting.enabled
    assert settings.queueing.idle_timeout <= 1.0, "per-object workers do not outlive a burst (peak RSS)"


def test_a_resource_watched_under_two_owner_labels_gets_no_server_side_selector():
    """kopf joins a resource's selectors by "and": both owners' children would be lost."""
    both = [*TrainingJobReconciler.children, ChildWatch("v1", "Pod", "pods", launch.LABEL_ISVC, slim_resource)]
    assert ("", "v1", "pods") not in child_selectors(both)
    assert child_selectors(both)[("apps", "v1", "statefulsets")] == launch.LABEL_JOB
