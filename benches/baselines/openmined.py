"""OpenMined PSI (the `openmined-psi` package, P-256, GCS) timed the way
BENCHMARKS.md times this project: per element, one process, synthetic
strings, the false-positive rate per query matched to ours (2^-32).

Run through ./run-openmined.sh, which creates its own virtual environment.
Prints one JSON object.
"""

import argparse
import json
import time

import private_set_intersection.python as psi


def per_element(seconds: float, n: int) -> float:
    return seconds / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    registry = [f"registry-{i:09d}" for i in range(args.registry)]
    queries = [f"registry-{i:09d}" for i in range(0, args.queries, 2)] + [
        f"outsider-{i:09d}" for i in range(args.queries - args.queries // 2)
    ]
    # OpenMined's fpr is for the whole client set: per query 2^-32.
    fpr = len(queries) / 2**32

    best = {}

    def timed(name, n, fn):
        t = time.perf_counter()
        out = fn()
        us = per_element(time.perf_counter() - t, n)
        best[name] = min(best.get(name, us), us)
        return out

    server = psi.server.CreateWithNewKey(True)
    for _ in range(args.repeats):
        client = psi.client.CreateWithNewKey(True)
        setup = timed("server_setup_us", len(registry),
                      lambda: server.CreateSetupMessage(fpr, len(queries), registry, psi.DataStructure.GCS))
        request = timed("client_request_us", len(queries), lambda: client.CreateRequest(queries))
        response = timed("server_response_us", len(queries), lambda: server.ProcessRequest(request))
        found = timed("client_intersection_us", len(queries), lambda: client.GetIntersection(setup, response))
        assert len(found) == args.queries // 2 + (args.queries % 2), "wrong intersection"

    result = {
        "registry": args.registry,
        "queries": len(queries),
        **{k: round(v, 2) for k, v in best.items()},
        "client_total_us": round(best["client_request_us"] + best["client_intersection_us"], 2),
        "setup_bytes_per_entry": round(len(setup.SerializeToString()) / len(registry), 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
