"""Single-process tests of the ring-exchange CLIP loss (pretrain/loss/ring.py).

W ranks are simulated by W threads of this process joined by queues (`ThreadRing`, the
same hop semantics as the process-group ring), so many world sizes, unequal and empty local
batches and block sizes run in seconds. Every case is compared with ONE computation of the
plain "clip" loss on the full global batch, under the convention of clip.py: the mean of the
ranks' losses is the full-batch loss, rank r's own-feature gradient is world x the
full-batch gradient of its rows, the rank-mean logit-scale gradient is the full-batch one.
The real gloo ranks are tested in tests/test_loss_dist.py.

Run: `.venv/bin/python -m pytest -q tests/test_loss_ring.py`
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
import torch

from pretrain.loss import clip_loss, get_loss
from pretrain.loss.common import rank_share
from pretrain.loss.ring import RingCLIP, _SingleRing, clip_loss_ring, ring_local_sum


def unit_rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(dtype)


class ThreadRing:
    """Rank `rank` of a ring of threads: a hop puts a copy into the next rank's queue for
    that tag. Records the largest block (rows) this rank ever held."""

    def __init__(self, rank: int, sizes: list[int], queues: dict[tuple[int, int], queue.Queue]) -> None:
        self.rank, self.world, self.sizes, self.queues = rank, len(sizes), sizes, queues
        self.max_rows = 0

    def start_shift(self, tensor: torch.Tensor, recv_rows: int, tag: int) -> Any:
        self.queues[(self.rank + 1) % self.world, tag].put(tensor.detach().clone())
        return recv_rows, tag

    def finish_shift(self, handle: Any) -> torch.Tensor:
        recv_rows, tag = handle
        got = self.queues[self.rank, tag].get(timeout=30)
        assert got.shape[0] == recv_rows
        self.max_rows = max(self.max_rows, got.shape[0])
        return got


def run_ring(img: torch.Tensor, txt: torch.Tensor, log_scale: float, sizes: list[int],
             block_size: int | None, bf16_autocast: bool = False) -> list[dict[str, Any]]:
    """Every rank's loss and gradients, each rank in its own thread (autocast is per thread,
    so it is entered there)."""
    queues: dict[tuple[int, int], queue.Queue] = {
        (r, t): queue.Queue() for r in range(len(sizes)) for t in (17, 18, 19, 20)}
    out: list[dict[str, Any]] = [{} for _ in sizes]
    errors: list[BaseException] = []

    def rank_fn(rank: int) -> None:
        try:
            start = sum(sizes[:rank])
            sl = slice(start, start + sizes[rank])
            i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
            ls = torch.tensor([log_scale], dtype=img.dtype, requires_grad=True)
            ring = ThreadRing(rank, sizes, queues)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
                local = ring_local_sum(i, t, ls.exp().reshape(()), ring, block_size)
            loss = rank_share(local, len(sizes), sum(sizes))
            loss.backward()
            out[rank] = {"loss": loss.detach(), "img": i.grad, "txt": t.grad, "scale": ls.grad,
                         "max_rows": ring.max_rows}
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(len(sizes))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    if errors:
        raise errors[0]
    return out


def full_batch(img: torch.Tensor, txt: torch.Tensor, log_scale: float) -> dict[str, torch.Tensor]:
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ls = torch.tensor([log_scale], dtype=img.dtype, requires_grad=True)
    loss = clip_loss(i, t, ls.exp())
    loss.backward()
    return {"loss": loss.detach(), "img": i.grad, "txt": t.grad, "scale": ls.grad}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", [[5], [4, 4], [3, 5, 2], [2, 0, 6, 1, 3]])
@pytest.mark.parametrize("block_size", [1, 3, None])
@pytest.mark.parametrize("log_scale", [2.66, 4.6052])  # 1/0.07 and the clamp value 100
def test_ring_equals_full_batch(dtype: torch.dtype, sizes: list[int], block_size: int | None,
                                log_scale: float) -> None:
    # float64: the algorithm itself is exact (1e-10). float32: the 1e-5, against the
    # plain loss in float32 (at scale 100 with d = 6 both are ~8e-6 off the float64 values).
    img, txt = unit_rows(sum(sizes), 6, 0, dtype), unit_rows(sum(sizes), 6, 1, dtype)
    ref = full_batch(img, txt, log_scale)
    ranks = run_ring(img, txt, log_scale, sizes, block_size)
    world = len(sizes)
    tol = 1e-10 if dtype == torch.float64 else 1e-5

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{sizes} {what}: {m}")

    close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"], "mean loss")
    close(torch.stack([r["scale"] for r in ranks]).mean(0), ref["scale"], "scale grad")
    start = 0
    for rank, r in enumerate(ranks):
        sl = slice(start, start + sizes[rank])
        start += sizes[rank]
        close(r["img"] / world, ref["img"][sl], f"rank {rank} image grad")
        close(r["txt"] / world, ref["txt"][sl], f"rank {rank} text grad")
        # never more than one rank's block at a time, never the gathered batch
        assert r["max_rows"] <= max(sizes)


def test_single_ring_gradcheck_float64() -> None:
    a = unit_rows(5, 4, 2, torch.float64).requires_grad_()
    c = unit_rows(5, 4, 3, torch.float64).requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def fn(a: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return RingCLIP.apply(a, c, s, _SingleRing(5), 2)

    assert torch.autograd.gradcheck(fn, (a, c, s), fast_mode=True)
    ce_i, ce_t = fn(a, c, s)
    labels = torch.arange(5)
    torch.testing.assert_close(ce_i, torch.nn.functional.cross_entropy(s * a @ c.T, labels, reduction="none"))
    torch.testing.assert_close(ce_t, torch.nn.functional.cross_entropy(s * c @ a.T, labels, reduction="none"))


def test_unequal_row_gradients_reach_every_rank() -> None:
    # A per-row weighting of the losses (not a uniform mean) must still come out exact: the
    # column gradients carry each rank's own row weights around the ring.
    sizes = [3, 4]
    img, txt = unit_rows(7, 5, 4), unit_rows(7, 5, 5)
    w = torch.linspace(0.5, 2.0, 7)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(7.0)
    ce = torch.nn.functional.cross_entropy
    labels = torch.arange(7)
    ref = (w * (ce(s * i @ t.T, labels, reduction="none") + ce(s * t @ i.T, labels, reduction="none"))).sum()
    ref_img, ref_txt = torch.autograd.grad(ref, [i, t])

    queues: dict[tuple[int, int], queue.Queue] = {(r, g): queue.Queue() for r in range(2) for g in (17, 18, 19, 20)}
    grads: list[Any] = [None, None]

    def rank_fn(rank: int) -> None:
        sl = slice(0, 3) if rank == 0 else slice(3, 7)
        a, b = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
        ce_i, ce_t = RingCLIP.apply(a, b, s, ThreadRing(rank, sizes, queues), 2)
        (w[sl] * (ce_i + ce_t)).sum().backward()
        grads[rank] = (a.grad, b.grad)

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    torch.testing.assert_close(torch.cat([grads[0][0], grads[1][0]]), ref_img)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]]), ref_txt)


def test_registry_single_process_and_errors() -> None:
    img, txt = unit_rows(6, 4, 6), unit_rows(6, 4, 7)
    want = clip_loss(img, txt, 9.0).item()
    assert get_loss("clip_ring", block_size=2)(img, txt, 9.0).item() == pytest.approx(want, rel=1e-6)
    assert clip_loss_ring(img, txt, torch.tensor([9.0])).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        clip_loss_ring(img, txt, 9.0, block_size=0)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss_ring(img, txt[:5], 9.0)


def test_ring_under_autocast_matches_plain() -> None:
    # bf16 autocast: the ring's backward recomputes under the forward's autocast state
    img, txt = unit_rows(24, 16, 8), unit_rows(24, 16, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = full_batch(img, txt, 2.66)
    got = run_ring(img, txt, 2.66, [12, 12], 5, bf16_autocast=True)
    for key in ("img", "txt"):
        w = want[key]
        g = torch.cat([r[key] for r in got]) / 2
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())
