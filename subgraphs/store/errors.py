"""The one error type of UniHealth.

Contract: every failure a client can cause is raised as :class:`FhirError`, carrying the HTTP
status, the OperationOutcome ``issue.code`` and a human ``diagnostics`` text (plus an optional
FHIRPath ``expression``). It is rendered in exactly one place per protocol:
:func:`fhir_rest.outcome.render_error` for REST (GraphQL errors later map the same fields).
Messages never contain stack traces or SQL.
"""

from __future__ import annotations

from typing import Any


class FhirError(Exception):
    """A client-visible failure: ``status`` is the HTTP status, ``code`` the IssueType code."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: list[str] | None = None,
        severity: str = "error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression or []
        self.severity = severity
        self.headers = headers or {}

    def outcome(self) -> dict[str, Any]:
        """The OperationOutcome resource describing this error."""
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = self.expression
        return {"resourceType": "OperationOutcome", "issue": [issue]}


def bad_request(diagnostics: str, *, code: str = "invalid", expression: list[str] | None = None) -> FhirError:
    return FhirError(400, code, diagnostics, expression=expression)


def not_found(resource_type: str, resource_id: str) -> FhirError:
    """The same answer whether the id is absent or owned by another facility (no existence oracle)."""
    return FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")


def gone(resource_type: str, resource_id: str, version: int) -> FhirError:
    return FhirError(410, "deleted", f"{resource_type}/{resource_id} was deleted", headers={"ETag": f'W/"{version}"'})


def conflict_version(expected: str, actual: int) -> FhirError:
    return FhirError(412, "conflict", f'If-Match {expected} does not match the current version W/"{actual}"')
