"""Bad input gets one clear message that names the field and the fix, from the models and from `aiaas validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aiaas.operator import api, load

GOOD = {
    "apiVersion": "aiaas.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "ok"},
    "spec": {"topology": {"nodes": 2, "nprocPerNode": 2}},
}


def with_spec(**changes) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return doc


BAD = [
    ("unknown field", with_spec(spec__topology__nodez=3), ["spec.topology.nodez", "unknown field"]),
    ("wrong type", with_spec(spec__topology__nodes="two"), ["spec.topology.nodes", "integer"]),
    ("bad enum", with_spec(spec__trainer={"model": {"architecture": "perceptron"}}),
     ["spec.trainer.model.architecture", "'cnn'"]),
    ("data x model != world", with_spec(spec__topology={"nodes": 2, "nprocPerNode": 2, "parallelism": {"data": 3}}),
     ["spec.topology.parallelism", "3 x 1 = 3 must equal nodes x nprocPerNode = 2 x 2 = 4"]),
    ("pipeline does not divide", with_spec(spec__topology={"nodes": 3, "parallelism": {"model": 2}}),
     ["spec.topology.parallelism.model", "do not divide the world size 3"]),
    ("more processes than GPUs",
     with_spec(spec__topology={"nprocPerNode": 4, "resources": {"limits": {"nvidia.com/gpu": 2}}}),
     ["spec.topology.nprocPerNode", "only 2 nvidia.com/gpu per pod"]),
    ("name too long", with_spec(metadata={"name": "a" * 60}), ["metadata.name", "at most 52 characters"]),
    ("name not DNS", with_spec(metadata={"name": "My_Job"}), ["metadata.name", "lower-case"]),
    ("batch does not split", with_spec(spec__trainer={"hyperparameters": {"batchSize": 30}},
                                       spec__topology={"nodes": 4}),
     ["spec.trainer.hyperparameters.batchSize", "does not split evenly across 4"]),
    ("elastic bounds", with_spec(spec__elastic={"minNodes": 3, "maxNodes": 4}),
     ["spec.elastic", "minNodes..maxNodes (3..4)"]),
    ("text without path", with_spec(spec__trainer={"dataset": {"kind": "text"}}), ["spec.trainer.dataset.path"]),
    ("negative epochs", with_spec(spec__trainer={"hyperparameters": {"epochs": 0}}),
     ["spec.trainer.hyperparameters.epochs", "greater than or equal to 1"]),
]


@pytest.mark.parametrize(("label", "doc", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_trainingjob_gets_a_message_naming_the_field(label: str, doc: dict, expected: list[str]) -> None:
    with pytest.raises(load.InvalidResource) as info:
        load.parse(doc, "job.yaml")
    text = "\n".join(info.value.errors)
    for fragment in expected:
        assert fragment in text, f"{label}: {fragment!r} not in {text!r}"
    assert len(info.value.errors) == 1, info.value.errors


def test_good_job_is_valid_and_derives_the_data_degree() -> None:
    job = load.parse(GOOD)
    assert isinstance(job, api.TrainingJob)
    assert job.spec.topology.world_size == 4 and job.spec.topology.data_degree == 4


def test_inferenceservice_source_rules() -> None:
    base = {"apiVersion": "aiaas.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "s"}}
    with pytest.raises(load.InvalidResource, match="exactly one of trainingJob"):
        load.parse(base | {"spec": {"model": {}}})
    with pytest.raises(load.InvalidResource, match="not of the form pvc://"):
        load.parse(base | {"spec": {"model": {"storageUri": "s3://bucket/x"}}})
    with pytest.raises(load.InvalidResource, match=r"minReplicas \(3\) must not exceed"):
        load.parse(base | {"spec": {"model": {"trainingJob": "j"}, "minReplicas": 3, "maxReplicas": 2}})


def test_wrong_kind_and_version() -> None:
    with pytest.raises(load.InvalidResource, match="kind: 'Deployment' is not one of"):
        load.parse({"apiVersion": "apps/v1", "kind": "Deployment"})
    with pytest.raises(load.InvalidResource, match="apiVersion: 'aiaas.dev/v1' must be aiaas.dev/v1alpha1"):
        load.parse(GOOD | {"apiVersion": "aiaas.dev/v1"})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiaas.operator", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_validate_reports_and_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(BAD[3][1]))
    result = run_cli("validate", "-f", str(bad))
    assert result.returncode == 1
    assert "spec.topology.parallelism: data x model = 3 x 1 = 3 must equal" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    result = run_cli("validate", "-f", str(good))
    assert result.returncode == 0 and "TrainingJob/ok is valid" in result.stdout
    assert run_cli("validate", "-f", str(tmp_path / "missing.yaml")).returncode == 1


def test_cli_render_and_crds(repo: Path) -> None:
    result = run_cli("render", "-f", str(repo / "examples" / "01-cnn-digits.yaml"))
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["NetworkPolicy", "Pod", "Service"]  # one node: a bare pod (render.trainingjob.workload_kind)
    crds = run_cli("crds")
    assert [d["kind"] for d in yaml.safe_load_all(crds.stdout)] == ["CustomResourceDefinition"] * 2


# ------------------------------------------------------------------ custom commands (issue 12, item 4)
CUSTOM = {"command": ["python", "-c", "import torch.distributed"]}


@pytest.mark.parametrize(("label", "doc"), [
    ("default batch 64 on 3 ranks", with_spec(spec__topology={"nodes": 3})),
    ("pipeline does not divide", with_spec(spec__topology={"nodes": 3, "parallelism": {"model": 2}})),
    ("data x model != world", with_spec(spec__topology={"nodes": 2, "nprocPerNode": 2, "parallelism": {"data": 3}})),
    ("text without path", with_spec(spec__trainer={"dataset": {"kind": "text"}})),
], ids=lambda v: v if isinstance(v, str) else "")
def test_rules_of_the_builtin_trainer_do_not_bind_a_custom_command(label: str, doc: dict) -> None:
    with pytest.raises(ValueError):
        api.TrainingJob.model_validate(doc)
    doc["spec"].setdefault("trainer", {}).update(CUSTOM)
    assert api.TrainingJob.model_validate(doc).spec.trainer.command == CUSTOM["command"]


def test_rules_that_still_bind_a_custom_command() -> None:
    doc = with_spec(spec__topology={"nprocPerNode": 4, "resources": {"limits": {"nvidia.com/gpu": 2}}},
                    spec__trainer=dict(CUSTOM))
    with pytest.raises(ValueError, match="nprocPerNode"):
        api.TrainingJob.model_validate(doc)


def test_the_custom_command_example_validates_with_three_nodes() -> None:
    [item] = load.load_file(Path(__file__).resolve().parents[2] / "examples" / "09-custom-command.yaml")
    assert item.obj.spec.topology.nodes == 3 and item.obj.spec.trainer.command
