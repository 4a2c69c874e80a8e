"""`moeserve bench serve`: a load tester for any OpenAI-compatible endpoint.

workloads.py makes the requests, loadtest.py sends them (arrivals, streaming, timing),
server_metrics.py diffs moeserve's /metrics around the run, report.py summarises, plots.py
draws, cli.py wires the flags. benchmarks/loadtest.py is the same tool as a script.
"""
