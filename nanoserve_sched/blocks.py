"""The paged KV cache's bookkeeping: which page holds which request's tokens. Pure Python.

The cache is a fixed pool of `num_blocks` pages of `block_size` token slots each. A request owns a
block table, the list of its pages in order; its token t lives in page table[t // block_size].

Prefix caching: once a page is full, it is named by a chained hash of its tokens and of the pages
before it, so a later request with the same prefix reuses the page instead of recomputing it (the
tokens are compared too, so a hash collision can never serve wrong keys). Pages are reference
counted; a page whose count drops to zero goes to the free queue but keeps its contents and its hash
until it is evicted, so it can still be revived by a hit. The free queue is LRU: `allocate` takes
pages from its front; freed pages without a hash go to the front, hashed ones to the back.

    >>> bm = BlockManager(num_blocks=4, block_size=2)
    >>> bm.allocate("a", 3)          # 3 tokens need 2 pages
    True
    >>> bm.block_table("a"), bm.num_free_blocks
    ([0, 1], 2)
"""

from collections import OrderedDict


class Page:
    __slots__ = ("id", "ref_cnt", "hash", "tokens")

    def __init__(self, page_id: int):
        self.id, self.ref_cnt, self.hash, self.tokens = page_id, 0, None, None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, on_event=None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one page of one slot (got {num_blocks} x {block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pages = [Page(i) for i in range(num_blocks)]
        self.free_queue = OrderedDict.fromkeys(range(num_blocks))  # O(1) pop-front, remove, append
        self.cached: dict[int, int] = {}  # hash -> page id
        self.tables: dict[str, list[int]] = {}  # request id -> its pages
        self.hashes: dict[str, list[int]] = {}  # request id -> hashes of its leading full pages
        self.on_event = on_event or (lambda kind, request_id, pages: None)  # for the trace

    @property
    def num_free_blocks(self):  # free, or cached and evictable
        return len(self.free_queue)

    @property
    def num_cached_free_blocks(self):
        return sum(self.pages[p].hash is not None for p in self.free_queue)

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, token_ids: list[int]) -> list[int]:
        """Pages of the longest cached run of full pages that starts `token_ids`.

        At most len(token_ids) - 1 tokens are covered: the last prompt token is always recomputed,
        because its logits are needed to sample the first output token.
        """
        if not self.enable_prefix_caching:
            return []
        hits, h, bs = [], None, self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash((h, tokens))
            page_id = self.cached.get(h)
            if page_id is None or self.pages[page_id].tokens != tokens:
                break
            hits.append(page_id)
        return hits

    def allocate(self, request_id: str, num_tokens: int, prefix: list[int] = ()) -> bool:
        """Grow the request's table to hold `num_tokens` tokens, starting it with the `prefix` hit
        pages if it is new. Returns False, changing nothing, when too few pages are free."""
        table = self.tables.get(request_id)
        if table is not None and not prefix and num_tokens <= len(table) * self.block_size:
            return True  # the common case, a decode inside its last page: nothing to do
        table = self.tables.setdefault(request_id, [])
        revived = [p for p in prefix if self.pages[p].ref_cnt == 0]  # cached pages sitting in the free queue
        need = self.pages_needed(num_tokens) - len(table) - len(prefix)
        if need + len(revived) > len(self.free_queue):
            if not table:
                del self.tables[request_id]
            return False
        for p in revived:
            del self.free_queue[p]
        for p in prefix:
            self.pages[p].ref_cnt += 1
        new = [self._pop_free() for _ in range(max(need, 0))]
        table += list(prefix) + new
        if prefix:
            self.hashes[request_id] = [self.pages[p].hash for p in prefix]
            self.on_event("shared", request_id, list(prefix))
        if new:
            self.on_event("allocated", request_id, new)
        return True

    def _pop_free(self) -> int:
        page_id, _ = self.free_queue.popitem(last=False)
        page = self.pages[page_id]
        if page.hash is not None:  # evict: the page's old contents can no longer be hit
            del self.cached[page.hash]
            page.hash = page.tokens = None
        page.ref_cnt = 1
        return page_id

    def cache_pages(self, request_id: str, token_ids: list[int], num_tokens: int) -> list[int]:
        """Name every full page among the request's first `num_tokens` (computed) tokens; returns the pages
        named now."""
        if not self.enable_prefix_caching:
            return []
        hashes, bs = self.hashes.get(request_id), self.block_size
        if hashes is not None and num_tokens // bs <= len(hashes):
            return ()  # no page filled up since the last call
        table, hashes = self.tables[request_id], self.hashes.setdefault(request_id, [])
        new = []
        for i in range(len(hashes), num_tokens // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash((hashes[-1] if hashes else None, tokens))
            hashes.append(h)
            page = self.pages[table[i]]
            if h not in self.cached:  # else an identical page is cached already; ours stays anonymous
                page.hash, page.tokens = h, tokens
                self.cached[h] = page.id
                new.append(page.id)
        if new:
            self.on_event("cached", request_id, new)
        return new

    def forget_names(self):
        """Unname every page (after a failed step, whose pages may never have been written): from now on no
        prefix can hit them; the pages themselves stay where they are."""
        for page in self.pages:
            page.hash = page.tokens = None
        self.cached.clear()

    def free(self, request_id: str):
        """Release all the request's pages (on finish, abort or preemption)."""
        table = self.tables.pop(request_id, [])
        self.hashes.pop(request_id, None)
        released = []
        for p in reversed(table):  # the tail first, so it is evicted before the shared head
            page = self.pages[p]
            page.ref_cnt -= 1
            if page.ref_cnt == 0:
                self.free_queue[p] = None
                if page.hash is None:
                    self.free_queue.move_to_end(p, last=False)  # nothing worth keeping: reuse first
                released.append(p)
        if table:
            self.on_event("freed", request_id, released)

    def check(self):
        """Assert the invariants; tests call this after every operation."""
        owners = {}
        for rid, table in self.tables.items():
            assert len(set(table)) == len(table), f"request {rid} holds a page twice: {table}"
            for p in table:
                owners[p] = owners.get(p, 0) + 1
        for page in self.pages:
            assert page.ref_cnt == owners.get(page.id, 0), f"page {page.id}: ref {page.ref_cnt} != owners"
            assert (page.ref_cnt == 0) == (page.id in self.free_queue), f"page {page.id} free/used mismatch"
            if page.hash is not None:
                assert self.cached[page.hash] == page.id, f"page {page.id} hashed but not in the cache map"
        assert len(self.cached) == sum(p.hash is not None for p in self.pages)
        used = sum(p.ref_cnt > 0 for p in self.pages)
        assert len(self.free_queue) + used == self.num_blocks, "free + used != total"
