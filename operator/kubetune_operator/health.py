"""Liveness and readiness endpoints on the operator's health port.

/healthz: the reconcile workers are running (a crashed worker pool means a restart is the cure).
/readyz:  kopf has started and handed over its caches, so the operator acts on what it sees.
"""

from __future__ import annotations

from aiohttp import web

from kubetune_operator.controller import Controller


async def start_health_server(controller: Controller, port: int) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        ok = controller.alive()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "reconcile workers stopped\n")

    async def readyz(_: web.Request) -> web.Response:
        ok = controller.ready.is_set() and controller.alive()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "starting\n")

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host="0.0.0.0", port=port).start()
    return runner
