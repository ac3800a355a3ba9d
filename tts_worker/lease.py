"""Job leases: a job runs on one worker at a time, and a vanished worker's job is back within RECOVERY_S.

kombu's Redis transport keeps every delivered, unacknowledged message in the hash `unacked`, with the
time it was delivered in the sorted set `unacked_index`. Every worker sweeps that index now and then
(`restore_visible`) and puts back on its queue each message delivered more than `visibility_timeout`
seconds ago. With that timeout above the longest job (kombu's default is an hour), the job of a worker
that vanished waits that long; below it, a long job still running on a live worker is delivered to a
second one.

So the timeout here is short and renewed, a lease, as SQS consumers extend a message's visibility:
the worker's main process stamps every message it holds with the current time, every `RECOVERY_S / 6`
seconds, from a thread of its own (a busy event loop, a reconnection or a warm shutdown waiting for
the running job does not stop it). A worker that vanishes stops stamping; its lease lapses after
`5/6 RECOVERY_S`, and the next sweep of any other worker, at most `RECOVERY_S / 6` later, restores the
message. kombu restores under a lock and in a transaction on `unacked`, so two workers sweeping at
once restore a message once. Stamps are the hosts' clocks, as kombu's own are: keep them in sync (NTP).

A worker that stops (or loses its connection) no longer puts the messages it holds back on the queue
itself: a job still running would be delivered twice. Its leases lapse and the sweep restores them.
A job that finishes after its connection was replaced is acknowledged through a live connection
(`LeasedRequest`): kombu would ack it on the closed channel, fail, and end the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps
from celery.worker import state
from celery.worker.request import Request
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from producer.redis_client import redis_client
from tts_contract import keys

__all__ = ["Lease", "LeaseRenewal", "LeasedRequest", "lease_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """The timings that bound recovery: a lease of `length_s`, renewed and swept every `interval_s`
    (lapsed at `length_s` after the last renewal, noticed within `interval_s`)."""

    length_s: float
    interval_s: float

    def transport_options(self) -> dict[str, float]:
        """kombu's Redis transport options that make its sweep honour the lease."""
        return {
            "visibility_timeout": self.length_s,
            "unacked_restore_interval": self.interval_s,
            "unacked_restore_throttle": 1,  # every call sweeps; the interval alone sets the pace
            # The sweep's lock: one held by a worker that died mid-sweep must not stall the others.
            "unacked_mutex_expire": max(1.0, self.interval_s / 2),
        }


def lease_for(recovery_s: float) -> Lease:
    """The lease that restores a vanished worker's job within `recovery_s`."""
    interval = recovery_s / 6
    return Lease(length_s=recovery_s - interval, interval_s=interval)


def _held_delivery_tags(consumer: Any) -> set[str]:
    """The delivery tags of every message this worker holds unacknowledged: those of the jobs it runs
    or has reserved, and those its channel still holds (a job waiting for its retry countdown)."""
    requests = [*state.reserved_requests, *state.active_requests]
    tags = {str(request.message.delivery_tag) for request in requests if request.message is not None}
    qos = getattr(getattr(consumer.task_consumer, "channel", None), "qos", None)
    tags.update(str(tag) for tag in list(getattr(qos, "_delivered", {})))
    return tags


class LeaseRenewal(bootsteps.StartStopStep):
    """A consumer step that renews the leases of the messages this worker holds, from a thread of
    its own, until the worker process ends."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    RETRY_S = 0.2
    """How often renewal is tried while Redis cannot be reached."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._warned = False  # one warning per outage, not one per try

    def start(self, consumer: Any) -> None:
        # kombu puts every message a channel holds back on its queue when the channel closes, a lost
        # connection included: the job still running here would then be delivered a second time.
        # Under leases, restoring is the sweep's work, and it happens only once a lease has lapsed.
        consumer.task_consumer.channel.qos.restore_at_shutdown = False
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(consumer,), name="lease-renewal", daemon=True
            )
            self._thread.start()

    def shutdown(self, consumer: Any) -> None:
        self._stopped.set()

    def _run(self, consumer: Any) -> None:
        """Renew every `unacked_restore_interval`; while Redis cannot be reached, try every
        RETRY_S instead, so that leases are renewed within moments of its return, before the
        consumer (which reconnects with a backoff of seconds) can sweep them as lapsed."""
        conf = consumer.app.conf
        interval = float(conf.broker_transport_options["unacked_restore_interval"])
        # A client of its own, with short timeouts: kombu's connection retries for seconds per try.
        client = redis_client(
            conf.broker_url,
            sentinel_master=conf.broker_transport_options.get("master_name"),
            socket_connect_timeout=1,
            socket_timeout=2,
        )
        wait = interval
        try:
            while not self._stopped.wait(wait):
                wait = interval if self._renew(consumer, client) else min(self.RETRY_S, interval)
        finally:
            client.close()

    def _renew(self, consumer: Any, client: redis.Redis) -> bool:
        """Stamp the held messages with the current time; False when Redis could not be reached."""
        try:
            tags = _held_delivery_tags(consumer)
        except RuntimeError:  # the sets changed while being read: the next round reads them again
            return True
        if not tags:
            return True
        try:
            # XX: only messages still unacknowledged; one acked or restored meanwhile is not brought back.
            client.zadd(keys.UNACKED_INDEX, dict.fromkeys(tags, time.time()), xx=True)
        except (RedisError, OSError) as exc:
            if not self._warned:
                log.warning("could not renew the lease of %d held job(s): %s; trying again", len(tags), exc)
            self._warned = True
            return False
        self._warned = False
        return True


class LeasedRequest(Request):
    """One delivery of a job, which can be settled after the connection it came on was lost.

    kombu settles a message on the channel that received it; once a lost connection has closed that
    channel, it raises AttributeError, which ends the worker. Here an ack goes through a live
    connection instead (the same two Redis commands kombu's ack sends), and a rejection is left to
    the lease: it lapses, and the sweep puts the job back on its queue."""

    def acknowledge(self) -> None:
        if self.acknowledged or not _closed(self.message):
            super().acknowledge()
            return
        tag = str(self.message.delivery_tag)
        try:
            with self.task.app.connection_for_write() as connection:
                channel: Any = connection.default_channel  # kombu's Redis channel
                with channel.client.pipeline() as pipe:
                    pipe.zrem(keys.UNACKED_INDEX, tag).hdel(keys.UNACKED, tag).execute()
        except (RedisError, OperationalError, OSError) as exc:
            log.warning("job %s: not acknowledged (%s); its lease will lapse and it runs again", self.id, exc)
        self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        if self.acknowledged or not _closed(self.message):
            super().reject(requeue=requeue)
            return
        if requeue:  # the lease lapses and the sweep requeues it
            self.acknowledged = True
        else:
            self.acknowledge()


def _closed(message: Any) -> bool:
    """Whether the channel `message` came on was closed (its connection lost and replaced)."""
    return getattr(message.channel, "connection", None) is None
