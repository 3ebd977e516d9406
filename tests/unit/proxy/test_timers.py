"""Deadline: restarting moves the expiry; stop and cancel prevent it; one loop timer."""

from __future__ import annotations

import asyncio

from remora.proxy.timers import Deadline


def test_restart_pushes_the_expiry_back_and_fires_once() -> None:
    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        done = loop.create_future()

        def fire() -> None:
            fired.append(loop.time())
            done.set_result(None)
        d = Deadline(loop, 0.05, fire)
        t0 = loop.time()
        d.start()
        await asyncio.sleep(0.03)
        d.start()                   # 0.03 s in: now due at ~0.08 s
        await asyncio.wait_for(done, 1.0)
        assert not d.running
        return [f - t0 for f in fired]
    fired = asyncio.run(run())
    assert len(fired) == 1 and fired[0] >= 0.079


def test_stop_and_cancel_prevent_firing() -> None:
    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        a = Deadline(loop, 0.01, lambda: fired.append("a"))
        b = Deadline(loop, 0.01, lambda: fired.append("b"))
        c = Deadline(loop, 0.01, lambda: fired.append("c"))
        a.start()
        b.start()
        c.start()
        a.stop()
        b.cancel()
        await asyncio.sleep(0.05)   # well past every deadline
        return fired
    assert asyncio.run(run()) == ["c"]
