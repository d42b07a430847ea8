"""Render a kustomization the way `kustomize build` does, for the features deploy/k8s/ uses.

pip and npm carry no kustomize binary, so CI may have none. This covers what
our overlays use and nothing more: `resources` (files and directories),
`namespace`, `images`, and strategic-merge `patches` by path. Lists of objects
that all have a `name` (containers, env, volumes, volumeMounts, ports) merge by
name, as Kubernetes' patch strategy does for the lists we patch; other lists
are replaced. tests/test_k8s_manifests.py checks this renderer against a real
kustomize wherever one is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                  "PriorityClass", "CustomResourceDefinition"}
KUSTOMIZATION = "kustomization.yaml"


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(base, patch):
    """Strategic merge of `patch` into a copy of `base`."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec", {})
    return spec.get("template", {}).get("spec") if "template" in spec else None


def image_name(reference: str) -> str:
    """"registry:5000/app:tag@sha256:..." -> "registry:5000/app"."""
    reference = reference.split("@")[0]
    head, _, last = reference.rpartition("/")
    return f"{head}/{last.split(':')[0]}" if head else last.split(":")[0]


def set_images(objects: list[dict], images: list[dict]) -> None:
    for obj in objects:
        pod = _pod_spec(obj)
        for container in (pod.get("containers", []) + pod.get("initContainers", [])) if pod else []:
            for image in images:
                if image["name"] == image_name(container["image"]):
                    name = image.get("newName", image["name"])
                    container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` prints (order aside)."""
    kustomization = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    for entry in kustomization.get("patches", []):
        for patch in load_documents(folder / entry["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            matches = [i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == key]
            assert len(matches) == 1, f"patch {entry['path']} targets {key}, found {len(matches)}"
            objects[matches[0]] = merge(objects[matches[0]], patch)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    set_images(objects, kustomization.get("images", []))
    return objects
