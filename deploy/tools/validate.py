#!/usr/bin/env python3
"""Offline validation of rendered Kubernetes manifests.

  validate.py [--k8s-version 1.30 ...] RENDERED.yaml ...

- every object: a mapping with apiVersion, kind, metadata.name (DNS-1123); namespaced
  objects carry a namespace; no two objects share kind/namespace/name;
- built-in kinds: validated with kubernetes-validate (schemas bundled in the wheel, no
  network), strict (unknown fields are errors), against every --k8s-version given;
- custom resources: validated against the subset schemas in crd-schemas/ (one per kind and
  apiVersion); a custom kind without a schema there is an error.

Exits 1 and lists every problem when anything is wrong.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

# kubernetes-validate reads its (large) definitions file for every object: read each file once.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents)

SCHEMA_DIR = Path(__file__).resolve().parent / "crd-schemas"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass"}


def is_builtin(api_version: str) -> bool:
    """core (v1), groups without a dot (apps, batch, policy, autoscaling) and *.k8s.io."""
    if "/" not in api_version:
        return True
    group = api_version.split("/", 1)[0]
    return "." not in group or group.endswith(".k8s.io")


def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(SCHEMA_DIR.glob("*.yaml")):
        schema = yaml.safe_load(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        props = schema["properties"]
        schemas[(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return schemas


def load(paths: list[str]) -> list[tuple[str, object]]:
    docs = []
    for p in paths:
        for doc in yaml.safe_load_all(Path(p).read_text()):
            if doc is not None:
                docs.append((p, doc))
    return docs


def validate(docs, versions: list[str]) -> list[str]:
    problems: list[str] = []
    schemas = crd_schemas()
    seen: set[tuple[str, str, str]] = set()
    counts = {"builtin": 0, "custom": 0}
    for origin, obj in docs:
        where = origin
        if not isinstance(obj, dict):
            problems.append(f"{where}: a document is not a mapping")
            continue
        api, kind, meta = obj.get("apiVersion"), obj.get("kind"), obj.get("metadata")
        if not isinstance(api, str) or not isinstance(kind, str) or not isinstance(meta, dict):
            problems.append(f"{where}: missing apiVersion, kind or metadata: {str(obj)[:120]}")
            continue
        name = meta.get("name")
        where = f"{origin}: {kind}/{name}"
        if not isinstance(name, str) or not DNS1123.match(name) or len(name) > 253:
            problems.append(f"{where}: metadata.name is not a DNS-1123 name")
        ns = meta.get("namespace")
        if kind not in CLUSTER_SCOPED and not ns:
            problems.append(f"{where}: namespaced object without metadata.namespace")
        key = (kind, ns or "", name or "")
        if key in seen:
            problems.append(f"{where}: duplicate object")
        seen.add(key)
        if kind not in {"ConfigMap", "Secret", "Namespace"} and "spec" not in obj:
            problems.append(f"{where}: no spec")

        if is_builtin(api):
            counts["builtin"] += 1
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    problems.append(f"{where}: invalid for Kubernetes {version}: {path}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    problems.append(f"{where}: Kubernetes {version} has no {api} {kind}")
        else:
            counts["custom"] += 1
            schema = schemas.get((api, kind))
            if schema is None:
                problems.append(f"{where}: custom resource {api} {kind} has no schema in "
                                f"{SCHEMA_DIR.name}/ (add one)")
                continue
            validator = jsonschema.Draft202012Validator(schema)
            for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in err.path)
                problems.append(f"{where}: {path}: {err.message}")
    print(f"validated {counts['builtin']} built-in objects (Kubernetes {', '.join(versions)}, "
          f"strict) and {counts['custom']} custom resources")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k8s-version", action="append", dest="versions")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    versions = args.versions or ["1.29", kubernetes_validate.latest_version()]
    problems = []
    for f in args.files:
        print(f"{Path(f).stem:5} ", end="")
        problems += validate(load([f]), versions)
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
