"""Fixtures of the real-node tests: the real node (skip when the cluster has
none) and a namespace whose pods all land on it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from node_util import REAL_NODE_LABEL, STEER_ANNOTATIONS, build_and_load


@pytest.fixture(scope="session")
def real_node(k8s_cluster, kubectl) -> dict:
    """The Ready node labelled aiaas.dev/real-node=true (skip if there is none)."""
    nodes = json.loads(kubectl("get", "nodes", "-l", f"{REAL_NODE_LABEL}=true", "-o", "json").stdout)["items"]
    if not nodes:
        pytest.skip(
            f"the cluster has no node labelled {REAL_NODE_LABEL}=true (hack/cluster.sh up starts one when "
            "the host can run it: root, cgroups; AIAAS_REAL_NODE=0 turns it off)"
        )
    node = nodes[0]
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
    assert ready, f"real node {node['metadata']['name']} is not Ready: {node['status'].get('conditions')}"
    return node


@pytest.fixture
def node_ns(real_node, namespace, kubectl) -> Iterator[str]:
    """A fresh namespace annotated so that all its pods run on the real node."""
    kubectl("annotate", "namespace", namespace, *(f"{k}={v}" for k, v in STEER_ANNOTATIONS.items()))
    yield namespace


@pytest.fixture(scope="session")
def images(real_node) -> dict[str, str]:
    """The operator and trainer images of this tree, built if missing and loaded into the real node once per
    session (the trainer image is ~6 GB)."""
    return build_and_load()
