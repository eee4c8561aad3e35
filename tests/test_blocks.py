"""The block manager in isolation: random sequences of what a scheduler does keep every invariant,
a prefix hit always serves pages holding exactly the request's tokens, and no page ever leaks."""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoserve_sched.blocks import BlockManager


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bs = 3
        self.bm = BlockManager(num_blocks=12, block_size=self.bs)
        self.tokens = {}  # request -> its tokens
        self.computed = {}  # request -> tokens whose K/V are "written"
        self.written = {}  # page -> {offset: token}: what the cache really holds
        self.next_id = 0

    def write(self, rid, upto):
        """Pretend the device computed tokens computed[rid]..upto of the request into its pages."""
        table = self.bm.block_table(rid)
        for t in range(self.computed[rid], upto):
            self.written.setdefault(table[t // self.bs], {})[t % self.bs] = self.tokens[rid][t]
        self.computed[rid] = upto
        self.bm.cache_pages(rid, self.tokens[rid], upto)

    # a tiny alphabet and shared starts make prefix hits common
    @rule(prefix=st.sampled_from([(), (1, 2, 3), (1, 2, 3, 4, 5, 6)]), rest=st.lists(st.integers(0, 2), max_size=8))
    def add(self, prefix, rest):
        tokens = list(prefix) + rest
        if not tokens:
            return
        rid, self.next_id = str(self.next_id), self.next_id + 1
        hits = self.bm.lookup_prefix(tokens)
        assert len(hits) * self.bs < len(tokens), "at least one token must be recomputed"
        for i, page in enumerate(hits):  # a hit serves exactly this request's tokens
            assert [self.written[page][o] for o in range(self.bs)] == tokens[i * self.bs : (i + 1) * self.bs]
        if self.bm.allocate(rid, len(tokens), hits):
            self.tokens[rid], self.computed[rid] = tokens, len(hits) * self.bs
            self.write(rid, len(tokens))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 4))
    def append(self, data, n):  # decode steps: new tokens need new pages now and then
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        new = self.tokens[rid] + [data.draw(st.integers(0, 2)) for _ in range(n)]
        if self.bm.allocate(rid, len(new)):
            self.tokens[rid] = new
            self.write(rid, len(new))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):  # finish, abort and preemption all free the request's pages
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(rid)
        del self.tokens[rid], self.computed[rid]

    @invariant()
    def invariants_hold(self):
        self.bm.check()

    def teardown(self):
        for rid in list(self.tokens):
            self.bm.free(rid)
        self.bm.check()
        assert self.bm.num_free_blocks == self.bm.num_blocks and not self.bm.tables, "a page leaked"


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_failed_allocation_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.allocate("a", 8)
    assert not bm.allocate("b", 1)
    assert not bm.allocate("a", 9)
    assert bm.block_table("a") == [0, 1] and "b" not in bm.tables
    bm.check()


def test_lru_keeps_cached_pages_until_needed():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.cache_pages("a", [7, 7, 8, 8], 4)
    bm.free("a")
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 2
    assert bm.allocate("b", 4)  # takes the two never-used pages first
    assert bm.lookup_prefix([7, 7, 8, 8, 9]) == [0, 1]  # still cached
    assert bm.allocate("c", 4)  # now the cache must be evicted
    assert bm.lookup_prefix([7, 7, 8, 8, 9]) == []
    bm.check()


def test_hit_needs_equal_tokens_not_just_equal_hash():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm.cache_pages("a", [1, 2], 2)
    page = bm.pages[bm.block_table("a")[0]]
    page.tokens = (9, 9)  # as if another prefix had collided into the same hash
    assert bm.lookup_prefix([1, 2, 3]) == []
