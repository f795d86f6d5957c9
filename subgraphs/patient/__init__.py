"""The patient subgraph (Patient, Encounter, AllergyIntolerance, Condition); see :mod:`.schema`."""
