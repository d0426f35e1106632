"""The clinician's pages: upload, list, study."""
