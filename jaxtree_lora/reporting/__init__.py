"""Reporting: results.json and metrics.jsonl (`results`), terminal and Markdown tables (`tables`),
the accuracy-matrix heat map (`plots`)."""
