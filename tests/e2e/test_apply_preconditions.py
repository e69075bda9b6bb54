"""The API server's answers that the runtime's writes rely on (operator/k8s.py ``Kube.apply``), on a real one.

A child is written by server-side apply with a precondition, so that no write can take over an object the
operator does not own: ``create_only`` (a first apply may only create), ``uid`` (an update only touches the
object applied before). These tests pin down the API server's side of that: what each refusal is, that it
writes nothing, and that an object created this way is owned as an apply (a later apply removes what it no
longer sets).
"""

from __future__ import annotations

from typing import Any

import pytest

from aiaas.operator.k8s import Kube, KubeError

pytestmark = pytest.mark.e2e


def child(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """A headless Service (a kind the operator manages) whose labels stand for any fields."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "child", "namespace": namespace, "labels": labels},
            "spec": {"clusterIP": "None", "ports": [{"name": "p", "port": 80}]}}


def held_labels(kube: Kube, namespace: str) -> dict[str, str] | None:
    held = kube.get("v1", "Service", namespace, "child")
    return None if held is None else held["metadata"].get("labels", {})


def test_create_only_and_uid_preconditions_refuse_without_writing(k8s_api, namespace: str) -> None:
    kube = Kube(k8s_api, "aiaas-test")
    created = kube.apply(child(namespace, {"a": "1", "b": "2"}), create_only=True)
    uid = created["metadata"]["uid"]
    assert [(m["manager"], m["operation"]) for m in created["metadata"]["managedFields"]] == [("aiaas-test", "Apply")]

    with pytest.raises(KubeError) as taken:  # the name is taken: a create-only apply writes nothing
        kube.apply(child(namespace, {"a": "changed"}), create_only=True)
    assert taken.value.status == 409
    assert held_labels(kube, namespace) == {"a": "1", "b": "2"}

    updated = kube.apply(child(namespace, {"a": "1"}), uid=uid)  # an update by UID; b is no longer set
    assert updated["metadata"]["labels"] == {"a": "1"}, "created by apply: a later apply removes what it leaves out"

    kube.delete("v1", "Service", namespace, "child")
    with pytest.raises(KubeError) as gone:  # ours is gone: an update by its UID creates nothing
        kube.apply(child(namespace, {"a": "again"}), uid=uid)
    assert gone.value.status == 409 and held_labels(kube, namespace) is None

    theirs = Kube(k8s_api, "someone-else").apply(child(namespace, {"theirs": "yes"}))
    with pytest.raises(KubeError) as replaced:  # someone else's object holds the name now: left alone
        kube.apply(child(namespace, {"a": "mine"}), uid=uid)
    assert replaced.value.status == 422
    assert held_labels(kube, namespace) == theirs["metadata"]["labels"] == {"theirs": "yes"}
