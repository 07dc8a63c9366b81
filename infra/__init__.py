"""How the project runs: an embedded S3 server for tests and demos, the cluster image, the runbook."""
