"""Deployments: manifest validation and packaging (pure), then rollout and recovery.

::

    CreateDeploymentRequest ─► validate_manifest ─► ValidManifest ─► build_package ─► Package
                                  (manifest.py)                        (package.py)     data, sha256
                                                 └─► replica_request() ─► controller.scheduling.place

``manifest_units.py`` parses sizes and CPU amounts, ``manifest_health.py`` the health
check. Agents call :func:`verify_package` and :func:`unpack_package`
(``package_unpack.py``) on what they receive.

At run time (not imported here, to keep this package's pure parts light), after
Nomad's planner and harness (DESIGN.md, "Deciding and doing"):

* the pure core: ``records.py`` (typed statuses and the replica record),
  ``decide.py`` (rollout, retry elsewhere, settle, scale, recovery, reconcile),
  ``versions.py`` (rolling update and revert), ``fencing.py`` (what nodes report),
  each returning a plan (``plans.py``); ``plan.py`` is the one placement helper;
* the harness: ``harness.py`` (applies plans, one transaction each) with
  ``harness_index.py`` (the in-memory index), ``commands.py`` (the narrow interface
  to nodes), ``creates.py``, ``rollout.py``, ``recovery.py`` and ``updates.py``
  (sequence the decisions around the nodes' answers), ``protos.py`` (deployments as
  the API returns them), ``service.py``
  (:class:`~controller.deployments.service.DeploymentService`, the façade the RPCs
  and the fleet's hooks call), ``snapshot.py`` (the scheduling snapshot built from
  the fleet and the placed replicas) and ``repository.py`` (deployment rows and
  kept packages).
"""

from controller.deployments.manifest import (
    APP_TYPES,
    MAX_SOURCE_BYTES,
    RUNTIMES,
    Runtime,
    ValidManifest,
    validate_manifest,
)
from controller.deployments.manifest_health import HealthCheckSpec
from controller.deployments.manifest_units import parse_cpu, parse_size_mb
from controller.deployments.package import Package, build_package, render_dockerfile
from controller.deployments.package_unpack import (
    MAX_MEMBERS,
    MAX_UNPACKED_BYTES,
    PackageLimits,
    unpack_package,
    verify_package,
)

__all__ = [
    "APP_TYPES",
    "MAX_MEMBERS",
    "MAX_SOURCE_BYTES",
    "MAX_UNPACKED_BYTES",
    "RUNTIMES",
    "HealthCheckSpec",
    "Package",
    "PackageLimits",
    "Runtime",
    "ValidManifest",
    "build_package",
    "parse_cpu",
    "parse_size_mb",
    "render_dockerfile",
    "unpack_package",
    "validate_manifest",
    "verify_package",
]
