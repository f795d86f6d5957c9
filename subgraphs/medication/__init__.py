"""The medication subgraph (MedicationRequest, Medication; Patient.medicationRequests); see :mod:`.schema`."""
