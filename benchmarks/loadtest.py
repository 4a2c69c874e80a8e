#!/usr/bin/env python3
"""Load-test an OpenAI-compatible endpoint: the same tool as `moeserve bench serve`.

    python benchmarks/loadtest.py --base-url http://127.0.0.1:8000 --num-requests 200 \\
        --request-rate 4 --goodput ttft:500 tpot:50 e2e:10000 --result-json out.json

`--help` lists every flag; the logic lives in moeserve/bench/.
"""

import sys

from moeserve.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
