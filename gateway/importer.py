"""Bulk import of NDJSON files and Bundles into the store.

Contract: :func:`import_file` reads one file (NDJSON: one resource per line; or a JSON Bundle),
writes resources in batches of ``batch_size`` per transaction with the ids they carry (update-as-
create; resources without an id get a new one), each into the facility named by its
``meta.tag`` with system :data:`FACILITY_TAG_SYSTEM` or else ``default_facility``. Transaction and
batch Bundles go through the normal Bundle interaction. Every resource is validated; a bad line
stops the import with its line number (earlier batches stay committed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from subgraphs.store import fhirjson
from subgraphs.store.access import AccessPolicy
from subgraphs.store.errors import FhirError, bad_request
from subgraphs.store.repository import Change, check_id, check_type, new_id

from .backends import Backends
from .context import RequestContext, check_facility

FACILITY_TAG_SYSTEM = "https://unihealth.dev/fhir/CodeSystem/facility"


def facility_of(resource: dict[str, Any], default: str | None) -> str:
    meta = resource.get("meta")
    if isinstance(meta, dict):
        for tag in meta.get("tag", []) or []:
            if isinstance(tag, dict) and tag.get("system") == FACILITY_TAG_SYSTEM and tag.get("code"):
                return check_facility(str(tag["code"]))
    if default is None:
        raise bad_request("the resource names no facility (meta.tag) and no default facility was given")
    return default


def _resources(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        head = fh.read(4096)
        fh.seek(0)
        stripped = head.lstrip()
        if stripped.startswith(b"{") and b'"Bundle"' in head and b"\n{" not in stripped:
            yield 1, fhirjson.parse(fh.read(), max_depth=128)
            return
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, fhirjson.parse(line, max_depth=128)


async def import_file(
    backends: Backends,
    path: Path,
    *,
    default_facility: str | None = None,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
    analyze: bool = True,
) -> int:
    """Import ``path``; returns the number of resources written. Refreshes the planner's statistics
    at the end unless ``analyze`` is False (parallel importers: the caller analyzes once)."""
    pending: dict[str, list[Change]] = defaultdict(list)
    written = 0

    async def flush(facility: str) -> None:
        nonlocal written
        changes = pending.pop(facility, [])
        if changes:
            async with backends.repository(facility, write=True) as repo:
                await repo.save_many(changes)
            written += len(changes)
            if progress:
                progress(len(changes))

    for number, resource in _resources(path):
        try:
            if not isinstance(resource, dict):
                raise bad_request("not a JSON object")
            if resource.get("resourceType") == "Bundle" and resource.get("type") in ("transaction", "batch"):
                from fhir_rest.interactions import bundle

                facility = default_facility or check_facility(None)
                ctx = RequestContext(facility=facility, base="", policy=AccessPolicy.unrestricted("import"))
                await bundle.process(ctx, backends, resource, "minimal")
                n = len(resource.get("entry", []))
                written += n
                if progress:
                    progress(n)
                continue
            items = (
                [e.get("resource") for e in resource.get("entry", [])]
                if resource.get("resourceType") == "Bundle"
                else [resource]
            )
            for item in items:
                if not isinstance(item, dict):
                    continue
                resource_type = check_type(str(item.get("resourceType")))
                resource_id = check_id(str(item["id"])) if "id" in item else new_id()
                facility = facility_of(item, default_facility)
                pending[facility].append(Change(resource_type, resource_id, item))
                if len(pending[facility]) >= batch_size:
                    await flush(facility)
        except FhirError as exc:
            raise FhirError(exc.status, exc.code, f"{path.name} line {number}: {exc.diagnostics}") from None
    for facility in list(pending):
        await flush(facility)
    if analyze:
        await backends.db.analyze()
    return written
