"""PageCache: one rank's KV pages, each free, in use (reference counted) or cached (content-addressed).

Prefix caching: a full page can be cached under the hash of its tokens chained with the hash of
every page before it (`extend_page_hashes`), so equal hashes mean equal prefixes. A request whose
first k page hashes are cached on its rank takes those pages into its page table (one more
reference each) instead of computing them. A cached page that no running request holds stays
cached, least recently released first in line, until an allocation needs it: then it is evicted
(its hash dropped) and handed out like a free page. A page in use is never evicted.

Accounting: `num_free` counts the pages an allocation can take (free plus cached-and-unused),
`num_used` the pages some running request holds, so num_free + num_used == num_pages always; the
reference count of a page equals the number of page tables that hold it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from nmoe_serve.engine.page_pool import PagePool


def extend_page_hashes(
    hashes: list[bytes], tokens: np.ndarray, page_size: int, lookahead: int = 0
) -> list[bytes]:
    """Append to `hashes` (those of the first len(hashes) pages of `tokens`) the hash of every
    further full page of `tokens` [n] int64 that has `lookahead` tokens after it; returns `hashes`.
    A page's hash covers its tokens, the `lookahead` tokens after it and, through its parent's
    hash, all the tokens before it. (Speculative decoding's draft layer keeps, at a token's slot,
    a value that depends on the next token too: its pages are hashed with lookahead 1.)"""
    tokens = np.asarray(tokens, np.int64)
    parent = hashes[-1] if hashes else b""
    for page in range(len(hashes), (tokens.shape[0] - lookahead) // page_size):
        chunk = tokens[page * page_size : (page + 1) * page_size + lookahead]
        parent = hashlib.blake2b(parent + chunk.tobytes(), digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PageCache:
    def __init__(self, num_pages: int, enabled: bool = True) -> None:
        """enabled=False: pages are never cached (allocate and release only)."""
        self.num_pages, self.enabled = num_pages, enabled
        self._free = PagePool(num_pages)  # pages holding nothing worth keeping
        self._refs = np.zeros(num_pages, np.int32)  # [NP] page tables holding each page
        self._hash_of: list[bytes | None] = [None] * num_pages  # [NP]
        self._page_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; first in line first

    @property
    def num_free(self) -> int:
        """Pages an allocation can take now: free, or cached and held by no request (evictable)."""
        return self._free.num_free + len(self._idle)

    @property
    def num_used(self) -> int:
        """Pages held by running requests (shared pages once)."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages holding a cached prefix page, in use or not."""
        return len(self._page_of)

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    def is_free(self, page: int) -> bool:
        """No request holds the page (it may still be cached)."""
        return self._refs[page] == 0

    def cached_pages(self) -> dict[bytes, int]:
        """hash -> page of every cached page (a copy)."""
        return dict(self._page_of)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of `hashes` (page hashes, in order)."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_idle(self, pages: Sequence[int]) -> int:
        """How many of `pages` no request holds: acquiring them takes that many from num_free."""
        return int(np.count_nonzero(self._refs[np.asarray(pages, np.int64)] == 0)) if pages else 0

    def acquire(self, pages: Sequence[int]) -> None:
        """One more reference to each of `pages` (cached pages from `match`, distinct)."""
        for page in pages:
            if self._hash_of[page] is None:
                raise RuntimeError(f"page {page} is not cached: only cached pages can be shared")
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1

    def allocate(self, count: int) -> np.ndarray | None:
        """`count` pages (int32) held once each, free ones first, then evicting the cached pages
        least recently released; None (and nothing taken) when fewer than `count` are available."""
        if count > self.num_free:
            return None
        pages = self._free.allocate(min(count, self._free.num_free))
        assert pages is not None
        evict = count - pages.size
        if evict:
            evicted = np.empty(evict, np.int32)
            for i in range(evict):
                page, _ = self._idle.popitem(last=False)
                self._uncache(page)
                evicted[i] = page
            pages = np.concatenate([pages, evicted])
        self._refs[pages] = 1
        return pages

    def release(self, pages: np.ndarray | Sequence[int]) -> None:
        """Drop one reference to each of `pages` (one request's page table, in order). A page no
        request holds any more stays cached if it is, later pages of the table first in line for
        eviction (a prefix's first pages are worth the most), or goes back to the free list."""
        pages = np.asarray(pages, np.int64)
        if pages.size == 0:
            return
        if np.any(self._refs[pages] <= 0) or np.unique(pages).size != pages.size:
            bad = int(pages[self._refs[pages] <= 0][0]) if np.any(self._refs[pages] <= 0) else int(pages[0])
            raise RuntimeError(f"page {bad} released twice: a request's page list is corrupt")
        self._refs[pages] -= 1
        unused = pages[self._refs[pages] == 0]
        to_free = []
        for page in unused[::-1].tolist():
            if self._hash_of[page] is None:
                to_free.append(page)
            else:
                self._idle[page] = None
        self._free.free(np.asarray(to_free[::-1], np.int32))

    def cache(self, page: int, page_hash: bytes) -> bool:
        """Record that `page` (held by a request, its tokens computed or planned in a step already
        sent) holds the full page whose hash is `page_hash`. False, and nothing changes, when caching
        is off or another page already holds that hash."""
        if not self.enabled or page_hash in self._page_of or self._hash_of[page] is not None:
            return False
        if self._refs[page] == 0:
            raise RuntimeError(f"page {page} is not held by a request: only a held page can be cached")
        self._hash_of[page] = page_hash
        self._page_of[page_hash] = page
        return True

    def reset(self) -> int:
        """Forget every cached page (the pages requests hold stay theirs); returns how many."""
        dropped = len(self._page_of)
        for page in list(self._page_of.values()):
            self._hash_of[page] = None
        self._page_of.clear()
        idle = np.fromiter(self._idle, np.int32, len(self._idle))
        self._idle.clear()
        self._free.free(idle)
        return dropped

    def _uncache(self, page: int) -> None:
        page_hash = self._hash_of[page]
        assert page_hash is not None
        del self._page_of[page_hash]
        self._hash_of[page] = None
