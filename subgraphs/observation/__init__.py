"""The observation subgraph (Observation; Patient.observations, Patient.latestVitals); see :mod:`.schema`."""
