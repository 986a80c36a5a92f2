"""PagePool: the free list of one rank's KV pages, as a preallocated stack. Every page has one
owner or none; allocating and freeing k pages are a few array operations, not k Python calls."""

from __future__ import annotations

import numpy as np


class PagePool:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._stack = np.arange(num_pages - 1, -1, -1, dtype=np.int32)  # [NP]: free pages, top at the end
        self._top = num_pages  # free pages are _stack[:_top]; the top hands out low ids first
        self._is_free = np.ones(num_pages, bool)  # [NP]

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_pages - self._top

    def allocate(self, count: int) -> np.ndarray | None:
        """`count` pages (int32, the lowest free ids first), or None (and nothing taken) when fewer are free."""
        if count > self._top:
            return None
        pages = self._stack[self._top - count : self._top][::-1].copy()
        self._top -= count
        self._is_free[pages] = False
        return pages

    def free(self, pages: np.ndarray | list[int]) -> None:
        pages = np.asarray(pages, np.int32)
        if pages.size == 0:
            return
        already = self._is_free[pages]
        if already.any() or np.unique(pages).size != pages.size:
            values, counts = np.unique(pages, return_counts=True)
            twice = int(pages[already][0]) if already.any() else int(values[counts > 1][0])
            raise RuntimeError(f"page {twice} freed twice: a request's page list is corrupt")
        self._is_free[pages] = True
        self._stack[self._top : self._top + pages.size] = pages
        self._top += pages.size

    def is_free(self, page: int) -> bool:
        return bool(self._is_free[page])
