"""`moeserve bench`: the measurements users run.

`bench serve`, a load tester for any OpenAI-compatible endpoint: workloads.py makes the
requests, loadtest.py sends them (arrivals, streaming, timing) into the records of
records.py, processes.py shares a run among several client processes, server_metrics.py
diffs moeserve's /metrics around the run, report.py summarises, plots.py draws.
benchmarks/loadtest.py is the same tool as a script.

`bench throughput`, the offline engine's tokens/s (throughput.py), against transformers and
the physical floors (floors.py), on a checkpoint or a synthetic Mixtral shape (synthetic.py);
the benchmark scripts in benchmarks/ build on the same three modules. cli.py wires the flags.
"""
