"""The payment logger's writer thread: it formats, sanitises and writes queued records with the
real handlers, so the event loop only builds the record."""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from typing import Any


class LogWriter:
    """A thread that writes the records put to it with ``handlers``, taking whatever queued up
    meanwhile as one batch: one write and one flush per handler (``emit_batch``, where a handler
    has one). ``stop`` writes everything still queued; a forked child starts its own thread."""

    _STOP = object()
    #: Records per batch, so one write stays small and a flood never holds lines back for long.
    BATCH = 256

    def __init__(self, handlers: list[logging.Handler]) -> None:
        self.handlers = handlers
        self.start()
        _writers.add(self)

    def start(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="payments-log", daemon=True)
        self._thread.start()

    def put(self, record: logging.LogRecord) -> None:
        self._queue.put(record)

    def _write(self) -> None:
        source = self._queue
        while True:
            batch = [source.get()]
            while len(batch) < self.BATCH:
                try:
                    batch.append(source.get_nowait())
                except queue.Empty:
                    break
            records: list[logging.LogRecord] = []
            for item in batch:
                if isinstance(item, logging.LogRecord):
                    records.append(item)
                    continue
                self._write_records(records)  # everything queued before a marker, first
                records = []
                if item is self._STOP:
                    return
                if isinstance(item, threading.Event):
                    item.set()
            self._write_records(records)

    def _write_records(self, records: list[logging.LogRecord]) -> None:
        if not records:
            return
        for handler in self.handlers:
            batch_writer = getattr(handler, "emit_batch", None)
            if batch_writer is None:
                for record in records:
                    if record.levelno >= handler.level:
                        handler.handle(record)
                continue
            handler.acquire()
            try:
                batch_writer(records)
            finally:
                handler.release()

    def flush(self) -> None:
        """Wait until every record queued so far is written."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            written = threading.Event()
            self._queue.put(written)
            written.wait(timeout=5)

    def stop(self) -> None:
        """Write everything queued so far, then end the thread."""
        _writers.discard(self)
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join(timeout=5)


#: Writers not stopped yet; a forked child restarts theirs (threads do not survive a fork).
_writers: weakref.WeakSet[LogWriter] = weakref.WeakSet()


def _restart_writers_after_fork() -> None:
    for writer in list(_writers):
        writer.start()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_writers_after_fork)
