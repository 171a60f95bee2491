"""Per-agent budgets without I/O: the token bucket, the journal share and its ledger (bounded memory)."""

from __future__ import annotations

from flowtunnel.gateway.budget import MAX_CHUNKS, AgentBudgets, BudgetConfig
from flowtunnel.gateway.nonces import NonceWindow, Seen


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_lets_a_batch_in_while_above_zero_and_says_when_it_refills() -> None:
    clock = Clock()
    budgets = AgentBudgets(BudgetConfig(rate=1000, burst=5000), clock=clock)
    assert budgets.check("a", default_wait=5) is None
    budgets.charge("a", 12_000)  # a batch bigger than the burst still went in once
    over = budgets.check("a", default_wait=5)
    assert over is not None
    assert (over.code, over.retry_after) == ("agent-rate", 8)
    assert budgets.check("b", default_wait=5) is None  # other agents are not affected
    clock.now = 6.9
    assert budgets.check("a", default_wait=5) is not None
    clock.now = 8.0
    assert budgets.check("a", default_wait=5) is None
    clock.now = 1000.0  # refills up to the burst only
    budgets.charge("a", 5000)
    assert budgets.check("a", default_wait=5) is not None


def test_the_share_is_released_as_the_journal_is_trimmed() -> None:
    budgets = AgentBudgets(BudgetConfig(share=1000))
    assert budgets.fits_share("a", 5000, default_wait=5) is None  # holding nothing: one batch always fits
    budgets.journaled("a", 10, 5000)
    over = budgets.fits_share("a", 1, default_wait=5)
    assert over is not None
    assert (over.code, over.retry_after) == ("agent-share", 5)
    assert budgets.check("a", default_wait=5) is not None
    budgets.trimmed(9)
    assert budgets.held("a") == 5000
    budgets.trimmed(10)
    assert budgets.held("a") == 0
    assert budgets.check("a", default_wait=5) is None


def test_the_ledger_stays_bounded_and_releases_merged_chunks_together() -> None:
    budgets = AgentBudgets(BudgetConfig(share=1 << 40))
    for seq in range(1, 10 * MAX_CHUNKS + 1):
        budgets.journaled("a", seq, 10)
    assert len(budgets._agents["a"].chunks) == MAX_CHUNKS
    assert budgets.held("a") == 100 * MAX_CHUNKS
    budgets.trimmed(MAX_CHUNKS - 1)
    assert budgets.held("a") == 100 * MAX_CHUNKS - 10 * (MAX_CHUNKS - 1)
    budgets.trimmed(10 * MAX_CHUNKS)
    assert budgets.held("a") == 0


def test_the_nonce_window_tells_copies_from_reuse_and_forgets_old_nonces() -> None:
    window = NonceWindow(window=2)
    key = bytes(32)
    assert window.check("a", key, b"n1", b"t1") is Seen.NEW
    assert window.check("a", key, b"n1", b"t1") is Seen.REPLAYED
    assert window.check("a", key, b"n1", b"t2") is Seen.REUSED
    assert window.check("b", key, b"n1", b"t2") is Seen.NEW  # per agent
    assert window.check("a", bytes(31) + b"\x01", b"n1", b"t2") is Seen.NEW  # a new key starts afresh
    window.check("a", key, b"n2", b"t")
    window.check("a", key, b"n3", b"t")
    assert window.check("a", key, b"n1", b"t9") is Seen.NEW  # beyond the window
