"""A local Ray instance of ours listens on the loopback address only (real Ray, its sockets)."""

from __future__ import annotations


def test_local_ray_listens_on_loopback_only(ray_local):
    """The shared fixture's instance is started like the CLI's (`local_init_kwargs`): every socket
    its processes listen on is bound to the loopback address."""
    import psutil

    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 3  # GCS, raylet, this driver's core worker at least
    wild = [(c.laddr, c.pid) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert wild == [], wild
