"""A local instance's Ray reachable from this machine only.

Ray's processes take work from whoever reaches their ports: GCS, the raylet and object manager, and each Serve
replica's inter-deployment gRPC server, which unpickles what it is sent. Ray turns a node address of
127.0.0.1 into the machine's network address, so `python -m serve run` on a loopback host still listened on
the network with all of them (on a laptop on a shared network: anyone on it). Ray's own switch for laptops,
RAY_LOOPBACK_ENV, keeps the node's address on loopback, which moves every Ray port there but one: each
replica's gRPC server, which Ray binds to [::]:0 whatever the node's address. `keep_replica_grpc_on_loopback`,
called first in every deployment's constructor (the server starts after it), binds that one to 127.0.0.1
where the node's address is loopback. The gRPC proxy (the API's gRPC port) still listens on every interface:
serve.auth answers it from loopback peers only while keys are off.
"""

from __future__ import annotations

LOOPBACK_NODE = "127.0.0.1"
# ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0" makes a node's address loopback, as on a laptop
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_RAY_ANY_INTERFACE = "[::]:0"  # ray/serve/_private/replica.py, the inter-deployment gRPC server's address


def keep_replica_grpc_on_loopback() -> bool:
    """In a replica of a node on loopback: its inter-deployment gRPC server binds 127.0.0.1. True where it will."""
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != LOOPBACK_NODE:
        return False
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        return False
    if not getattr(bind, "loopback_only", False):

        def on_loopback(server, address: str):
            return bind(server, f"{LOOPBACK_NODE}:0" if address == _RAY_ANY_INTERFACE else address)

        on_loopback.loopback_only = True
        replica.add_port_to_grpc_server = on_loopback
    return True
