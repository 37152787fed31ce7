"""The child process of `python -m serve run`: Ray on loopback with a known metrics port, then Ray's
own `serve run` on the effective config.

`serve run` starts Ray itself when none is running, but then the Prometheus export port is random;
starting Ray here first fixes it (`--metrics-port`), and `serve run` reuses this Ray.

SIGINT / SIGTERM stop Ray at once (ray.shutdown): `python -m serve run` has drained the proxies by then
(serve.proxy_middleware.Drain), and Serve's own shutdown (replica by replica, seconds each, then the
proxies) would not fit in Docker's 10 s grace.
"""

from __future__ import annotations

import argparse
import os
import signal

SERVE_NAMESPACE = "serve"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve.launcher")
    parser.add_argument("config")
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--node-ip", default="127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs Ray may schedule (default: the cores)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs Ray may schedule (default: detected)")
    options = parser.parse_args(argv)

    import ray
    from ray.serve.scripts import run

    ray.init(
        namespace=SERVE_NAMESPACE,
        _node_ip_address=options.node_ip,
        _metrics_export_port=options.metrics_port,
        include_dashboard=False,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
    )

    def stop(_signum, _frame):
        ray.shutdown()
        os._exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    run.main([options.config], prog_name="serve run")


if __name__ == "__main__":
    main()
