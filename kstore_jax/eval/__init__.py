"""QA evaluation: KV-cache greedy generation, exact match, storage (bio recall) check."""
