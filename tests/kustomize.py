"""`kustomize build` for deploy/kubernetes/, in Python: the subset of kustomize the manifests
use (resources, namespace, labels), refusing any other key so that nothing is silently
ignored. Debian has no kustomize package; where `kubectl kustomize` exists the tests compare
its output with this one's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources"}
# Kinds without a namespace (kustomize leaves them alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume"}


class KustomizeError(Exception):
    """A kustomization this subset does not understand, or a duplicate object."""


def key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    """What makes an object unique: group/version, kind, namespace, name."""
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def build(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` makes, in resource order."""
    doc = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(doc) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}: unsupported kustomization keys {sorted(unknown)}")
    if doc.get("kind") != "Kustomization":
        raise KustomizeError(f"{folder}: kind must be Kustomization")
    objects: list[dict[str, Any]] = []
    for resource in doc.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():
            objects += build(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    objects = copy.deepcopy(objects)
    for entry in doc.get("labels", []):
        if set(entry) - {"pairs"}:
            raise KustomizeError(f"{folder}: labels entries support only pairs")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    if "namespace" in doc:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = doc["namespace"]
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        if key(obj) in seen:
            raise KustomizeError(f"{folder}: {key(obj)} defined twice")
        seen.add(key(obj))
    return objects
