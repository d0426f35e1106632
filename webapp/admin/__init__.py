"""Admin pages: users, the audit log, the throughput and model dashboard."""
