"""Fake call_queue: a queue_lock that fails loudly (instead of freezing) when a thread takes it twice."""

import threading


class NonReentrantLock:
    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None
        self.acquisitions = 0

    def __enter__(self):
        if self.owner == threading.get_ident():
            raise RuntimeError("queue_lock taken re-entrantly: the real web UI would freeze here")
        self._lock.acquire()
        self.owner = threading.get_ident()
        self.acquisitions += 1
        return self

    def __exit__(self, *exc):
        self.owner = None
        self._lock.release()


queue_lock = NonReentrantLock()
