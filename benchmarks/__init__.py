"""Speed and memory benchmarks (not tests): each script prints a table and writes JSON to benchmarks/results/."""
