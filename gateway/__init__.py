"""UniHealth edge gateway: the process that serves FHIR REST (and, later, GraphQL)."""

__version__ = "0.1.0"
