"""A local instance's Ray reachable from this machine only.

Ray's processes take work from whoever reaches their ports: GCS, the raylet and object manager, and each Serve
replica's inter-deployment gRPC server, which unpickles what it is sent. Ray turns a node address of
127.0.0.1 into the machine's network address, so `python -m serve run` on a loopback host still listened on
the network with all of them (on a laptop on a shared network: anyone on it). Ray's own switch for laptops,
RAY_LOOPBACK_ENV, keeps the node's address on loopback, which moves every Ray port there but one: each
replica's gRPC server, which Ray binds to [::]:0 whatever the node's address. `keep_replica_grpc_on_loopback`,
called first in every deployment's constructor (the server starts after it), binds that one to the node's
address where that is loopback (127.0.0.1, as `python -m serve run` starts Ray; ::1 where loopback is IPv6
only). The gRPC proxy (the API's gRPC port) still listens on every interface: serve.auth answers it from
loopback peers only while keys are off.
"""

from __future__ import annotations

# ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0" makes a node's address loopback, as on a laptop
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray's token authentication (Ray >= 2.52): every Ray process, and every client of its ports, needs the token, which
# ray.init writes to ~/.ray/auth_token of the user it runs as, for a new local instance. Ray 2.60 turns it on by
# default only while RAY_AUTH_MODE is unset: a Ray listening beyond loopback must not depend on that.
RAY_TOKEN_AUTH_ENV = {"RAY_AUTH_MODE": "token"}
_RAY_ANY_INTERFACE = "[::]:0"  # ray/serve/_private/replica.py, the inter-deployment gRPC server's address


def keep_replica_grpc_on_loopback() -> bool:
    """In a replica of a node on loopback (127.x or ::1): its inter-deployment gRPC server binds the node's address.
    True where it will; where Ray no longer has the hook this wraps, an ERROR says the server listens on every
    interface (a Ray upgrade must not reopen it silently)."""
    import ipaddress
    import logging

    import ray
    from ray.serve._private import replica

    node = ray.util.get_node_ip_address()
    try:
        address = ipaddress.ip_address(node)
    except ValueError:  # Ray gives the node's IP address; a name is not one, and may resolve anywhere
        logging.getLogger("ray.serve").warning(
            f"the node's address {node!r} is not an IP address: the replica's inter-deployment gRPC server listens "
            "on every interface (serve.local_ray)"
        )
        return False
    if not address.is_loopback:
        return False
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        logging.getLogger("ray.serve").error(
            "this Ray has no ray.serve._private.replica.add_port_to_grpc_server: the replica's inter-deployment "
            "gRPC server listens on every interface (serve.local_ray)"
        )
        return False
    if not getattr(bind, "loopback_only", False):
        own = f"[{node}]:0" if address.version == 6 else f"{node}:0"

        def on_loopback(server, address: str):
            return bind(server, own if address == _RAY_ANY_INTERFACE else address)

        on_loopback.loopback_only = True
        replica.add_port_to_grpc_server = on_loopback
    return True
