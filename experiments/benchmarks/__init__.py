"""Speed and memory benchmarks; each prints a JSON object as its last line."""
