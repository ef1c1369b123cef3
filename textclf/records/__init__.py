"""Everything MLflow: a run's lifecycle and what it logs, the model registry and promotion, the journal kept while
a tracking server is unreachable, the sqlite store's lock, and a server's refusals as one line."""
