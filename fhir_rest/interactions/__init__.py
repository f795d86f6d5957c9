"""FHIR interactions: plain async functions over a repository and a :class:`RequestContext`.

They know nothing of HTTP requests or responses; they return :class:`fhir_rest.results.Result`.
"""
