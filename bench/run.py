"""Every benchmark, one after the other: the one command that starts all they need.

    python bench/run.py            # the full runs; results written to bench/results/
    python bench/run.py --smoke    # every part in its smoke mode, in under 5 minutes

Part 1 (bench/proxy_overhead.py): what a proxy costs, on fast fake upstreams. Part 2
(bench/fleet_quality.py): fleet quality on real llama-servers. Scale (bench/scale.py):
a thousand agents, a thousand upstreams. Each part prints its table; the full runs also
write them under bench/results/. The parts run one at a time: on a small machine two at
once would measure each other.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

PARTS: tuple[tuple[str, str, list[str]], ...] = (
    ("part 1, proxy cost", "proxy_overhead.py", ["--seconds", "5", "--repetitions", "3"]),
    ("part 2, fleet quality", "fleet_quality.py", []),
    ("scale", "scale.py", []),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part in its smoke mode")
    args = parser.parse_args()
    began = time.monotonic()
    for title, script, full in PARTS:
        print(f"== {title}: bench/{script}", file=sys.stderr, flush=True)
        argv = [sys.executable, str(BENCH / script), *(["--smoke"] if args.smoke else full)]
        if subprocess.run(argv, check=False).returncode != 0:
            print(f"== {title} failed", file=sys.stderr)
            return 1
    minutes = (time.monotonic() - began) / 60
    print(f"== every part ran, in {minutes:.1f} minutes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
