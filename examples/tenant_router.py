"""An example routing plugin: one pool per tenant, chosen by the first label of the SNI.

`acme.apps.example.com` goes to the backend or pool named `tenant-acme` when the rules
declare one; any other name gets no opinion (None), so the next rule decides:

    # rules/main.rules
    pool tenant-acme { member 10.0.0.5:443  member 10.0.0.6:443 }
    pool tenant-globex { members from redis "globex-*" }
    sni suffix ".apps.example.com" -> plugin(tenant_router)
    default -> reject

    # config/dynproxy.yaml (or an entry point in group dynproxy.plugins)
    plugins:
      - name: tenant_router
        module: "examples.tenant_router:TenantRouter"

What every plugin should copy from it: `route` is cheap (it runs for each new
connection, in the connection's greenlet, under a deadline), allocates nothing on the
hot path (decisions are made once per target and reused), never raises for ordinary
input, and answers None rather than guessing.
"""

from __future__ import annotations

from dynproxy.net.plugins import forward


class TenantRouter:
    name = "tenant_router"

    def __init__(self, target_prefix: str = "tenant-"):
        self.target_prefix = target_prefix
        self._decisions: dict = {}  # target name -> Decision, made once

    def route(self, context):
        sni = context.conn.sni
        if not sni:
            return None
        target = self.target_prefix + sni.partition(".")[0]
        topology = context.snapshot.topology
        if target not in topology.pools and target not in topology.backends:
            return None
        decision = self._decisions.get(target)
        if decision is None:
            decision = self._decisions[target] = forward(target)
        return decision
