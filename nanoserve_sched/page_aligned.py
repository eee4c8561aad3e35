"""The page-aligned scheduler (vLLM #19878): prefill chunks start and end on page boundaries.

A chunked prompt normally stops wherever the token budget runs out, so the next chunk starts in the
middle of a page and every KV write is a scatter of single slots. Here every non-final prefill chunk
is a whole number of pages, so each chunk starts on a page boundary and its keys and values can be
written page by page; the budget is charged in whole pages for prefill chunks to match.
"""

from nanoserve_sched.base import Scheduler


class PageAlignedScheduler(Scheduler):
    def __init__(self, config, recorder=None):
        if config.max_num_batched_tokens < config.block_size:
            raise ValueError(
                f"page-aligned scheduling needs --max-num-batched-tokens ({config.max_num_batched_tokens}) of at "
                f"least one page (--block-size {config.block_size})"
            )
        super().__init__(config, recorder)

    def chunk_size(self, req, budget):
        n = super().chunk_size(req, budget)
        end = req.num_computed_tokens + n
        if end < req.num_tokens:  # not the prompt's last chunk: stop at the last page boundary
            n -= end % self.config.block_size
        return n

    def charge(self, req, n):
        if req.num_computed_tokens - n < req.num_prompt_tokens:  # a prefill chunk: whole pages
            return -(-n // self.config.block_size) * self.config.block_size
        return n
