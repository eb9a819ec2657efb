"""Where cache entries live: Redis (shared by every worker and host) or this process's memory (no Redis).

Both stores offer the same steps with the same meaning, so the algorithm in :mod:`hyperion_lock.cache.engine`
has one path: ``read`` (and take the compute lease when there is no valid entry), ``take`` (a refresh lease),
``renew``, ``put`` (fenced: only the lease's owner, only if nothing was invalidated since the lease was taken),
``release`` (give the lease up and tell the waiters why), the three invalidations, and ``expect``: a future for
the next message about one entry, registered *before* the read so a message sent in between is not missed.

Every Redis step is one Lua script (:mod:`.lua`), keyed on the owner token of the call. Replies become the typed
values :class:`Read`, :class:`LeaseState`, :class:`PutResult`.

The modules: :mod:`.protocol` (the steps and their typed replies), :mod:`.memory`, :mod:`.redis` (client,
listener, store) and :mod:`.lua` (the scripts).
"""

from hyperion_lock.cache.store.lua import (
    INVALIDATE_KEY,
    INVALIDATE_NAMESPACE,
    INVALIDATE_TAG,
    KEEP,
    PUT,
    READ,
    RELEASE,
    RENEW,
    SCRIPTS,
    SECRET,
    TAKE,
)
from hyperion_lock.cache.store.memory import MemoryStore
from hyperion_lock.cache.store.protocol import (
    Entry,
    Header,
    LeaseState,
    Message,
    Observer,
    PutResult,
    Read,
    Store,
    TakeMode,
    close_quietly,
)
from hyperion_lock.cache.store.redis import RedisStore, client_for_cache

__all__ = [
    "INVALIDATE_KEY", "INVALIDATE_NAMESPACE", "INVALIDATE_TAG", "KEEP", "PUT", "READ", "RELEASE", "RENEW",
    "SCRIPTS", "SECRET", "TAKE", "Entry", "Header", "LeaseState", "MemoryStore", "Message", "Observer", "PutResult",
    "Read", "RedisStore", "Store", "TakeMode", "client_for_cache", "close_quietly",
]
