"""Our five SSL losses against those of lightly 1.6.0 (lightly.loss), on the same tensors: values and
the gradients w.r.t. the embeddings, in fp32 and fp64, in one process and on two gloo processes.

It guards the definitions themselves: a dropped factor, a transposed queue, a gather whose gradient
goes missing, or a changed normalisation would pass the hand-made cases of test_objectives.py but not
these. Where we differ from lightly by design, the test states the exact map:
- BYOL: our 2 - 2 cos is 2 + 2 x lightly's NegativeCosineSimilarity (-cos) per direction.
- MoCo v2: our queue is lightly's memory bank, both (K, D) and filled in the same order; only when K
  is not a multiple of the enqueued batch do they differ (we wrap around, lightly drops the rest).
- Under DDP lightly's SimCLR and VICReg losses are per rank (local anchors, local invariance), ours
  the whole global batch's on every rank: ours is the mean of lightly's over the ranks, and the input
  gradients are equal. Lightly's Barlow Twins averages correlations built with per-rank statistics;
  ours standardises over the global batch as the authors' SyncBatchNorm does.
Our SimCLR, BYOL, VICReg and MoCo losses compute in fp32 whatever the input (`.float()`), so with fp64
inputs they are held to fp32 rounding against lightly's fp64; Barlow Twins keeps fp64.
"""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssl_pipeline.objectives.barlow_twins import barlow_twins_loss, cross_correlation
from ssl_pipeline.objectives.byol import normalised_mse
from ssl_pipeline.objectives.common import gather_from_all_ranks, gather_without_gradient
from ssl_pipeline.objectives.moco_v2 import KeyQueue, info_nce
from ssl_pipeline.objectives.simclr import nt_xent
from ssl_pipeline.objectives.vicreg import vicreg_loss

# The peer library, pinned in requirements-benchmark.txt (which requirements.txt includes).
from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss

BATCH, DIM, QUEUE = 64, 32, 128
SIMCLR_TEMPERATURE, MOCO_TEMPERATURE, LAMBDA = 0.5, 0.2, 5e-3
VICREG_WEIGHTS = (25.0, 25.0, 1.0)  # our config's and lightly's defaults
DTYPES = [torch.float32, torch.float64]
over_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
# Largest error allowed, relative to the largest entry of the reference. fp32: measured errors are
# below 2e-6 (values 3e-7); fp64 where we compute in fp64: below 1e-14. A real change of a loss moves
# it by far more: a temperature or factor off by 0.1% fails, and Barlow Twins' old exact correlation
# was 0.38 off at scale 0.01.
FP32_TOLERANCE, FP64_TOLERANCE = 1e-5, 1e-12


def tolerance(dtype, computes_in_fp64=False):
    return FP64_TOLERANCE if dtype == torch.float64 and computes_in_fp64 else FP32_TOLERANCE


def assert_matches(ours, theirs, tol):
    """Max |ours - theirs| <= tol x max |theirs|, for a tensor or each of a sequence of them."""
    ours, theirs = ((t,) if isinstance(t, torch.Tensor) else tuple(t) for t in (ours, theirs))
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        assert mine.dtype == reference.dtype
        error = ((mine - reference).abs().max() / reference.abs().max()).item()
        assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


def embedding_pair(dtype, scale=1.0, seed=0, batch=BATCH, dim=DIM):
    """Two correlated views' embeddings (B, D), as a projector gives them: z2 = z1 + half as much noise."""
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=generator, dtype=dtype)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=generator, dtype=dtype)
    return scale * z1, scale * z2


def loss_and_gradients(loss_fn, *inputs):
    """loss_fn(*inputs) and its gradients w.r.t. each input, on fresh leaf copies."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def initial_queue(dtype, size=QUEUE, seed=3):
    """(K, D) unit keys, as a queue starts."""
    return F.normalize(torch.randn(size, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=1)


def moco_direction(query_embeddings, key_embeddings, negatives):
    """Our MoCo v2 loss of one direction on unnormalised embeddings, as MoCoV2.forward computes it."""
    queries, keys = (F.normalize(z, dim=1) for z in (query_embeddings, key_embeddings))
    return info_nce(queries, keys, negatives, MOCO_TEMPERATURE).to(query_embeddings.dtype)


def moco_memory_bank(keys, distributed=False):
    """lightly's NTXentLoss with a memory bank holding `keys` (K, D): the bank is stored (K, D), like
    our KeyQueue.keys, and handed to the loss transposed (D, K) (feature_dim_first)."""
    loss = NTXentLoss(MOCO_TEMPERATURE, memory_bank_size=tuple(keys.shape), gather_distributed=distributed)
    loss = loss.to(keys.dtype)  # its bank is an fp32 buffer
    assert loss.memory_bank.bank.shape == keys.shape
    loss.memory_bank.bank.copy_(keys)
    return loss


def our_queue(keys):
    queue = KeyQueue(*keys.shape).to(keys.dtype)
    queue.keys.copy_(keys)
    return queue


# ---- one process -------------------------------------------------------------------------------------

@over_dtypes
def test_simclr_nt_xent_equals_lightly_ntxent(dtype):
    z1, z2 = embedding_pair(dtype)
    ours = loss_and_gradients(lambda a, b: nt_xent(a, b, SIMCLR_TEMPERATURE).to(dtype), z1, z2)
    theirs = loss_and_gradients(NTXentLoss(SIMCLR_TEMPERATURE), z1, z2)
    assert_matches(ours[0], theirs[0], tolerance(dtype))
    assert_matches(ours[1], theirs[1], tolerance(dtype))


@over_dtypes
def test_byol_normalised_mse_is_two_plus_twice_lightly_negative_cosine(dtype):
    """Symmetrised as our BYOL: ours(p1, t2) + ours(p2, t1) = 4 + 2 (lightly(p1, t2) + lightly(p2, t1)),
    and its gradients twice lightly's. Per-sample, so under DDP there is nothing to gather."""
    p1, p2 = embedding_pair(dtype, seed=1)
    t1, t2 = embedding_pair(dtype, seed=2)
    cosine = NegativeCosineSimilarity()
    ours = loss_and_gradients(lambda a, b, c, d: (normalised_mse(a, d) + normalised_mse(b, c)).to(dtype),
                              p1, p2, t1, t2)
    theirs = loss_and_gradients(lambda a, b, c, d: cosine(a, d) + cosine(b, c), p1, p2, t1, t2)
    assert_matches(ours[0], 4 + 2 * theirs[0], tolerance(dtype))
    assert_matches(ours[1], [2 * grad for grad in theirs[1]], tolerance(dtype))


@over_dtypes
def test_vicreg_loss_equals_lightly_vicreg(dtype):
    """At half unit scale, so that the variance hinge is active on every dimension (std < 1)."""
    z1, z2 = embedding_pair(dtype, scale=0.5)
    ours = loss_and_gradients(lambda a, b: vicreg_loss(a, b, *VICREG_WEIGHTS).to(dtype), z1, z2)
    theirs = loss_and_gradients(VICRegLoss(*VICREG_WEIGHTS), z1, z2)
    assert_matches(ours[0], theirs[0], tolerance(dtype))
    assert_matches(ours[1], theirs[1], tolerance(dtype))


@pytest.mark.parametrize("scale", [1.0, 0.01])
@over_dtypes
def test_barlow_twins_equals_lightly_at_unit_and_small_scale(dtype, scale):
    """Both standardise with BatchNorm's eps 1e-5, so they agree where the exact correlation of eq. 2
    (our former loss) was 0.38 off: at scale 0.01 the eps is a tenth of the variance."""
    z1, z2 = embedding_pair(dtype, scale)
    ours = loss_and_gradients(lambda a, b: barlow_twins_loss(a, b, LAMBDA), z1, z2)
    theirs = loss_and_gradients(BarlowTwinsLoss(LAMBDA), z1, z2)
    assert_matches(ours[0], theirs[0], tolerance(dtype, computes_in_fp64=True))
    assert_matches(ours[1], theirs[1], tolerance(dtype, computes_in_fp64=True))


def exact_correlation_loss(z1, z2):
    """Barlow Twins on the exact correlation of eq. 2 (std clamped at 1e-6), what we no longer use."""
    def standardise(z):
        return (z - z.mean(dim=0)) / z.std(dim=0, unbiased=False).clamp_min(1e-6)
    correlation = standardise(z1).T @ standardise(z2) / len(z1)
    off_diagonal = correlation - torch.diag(correlation.diagonal())
    return (1 - correlation.diagonal()).pow(2).sum() + LAMBDA * off_diagonal.pow(2).sum()


@over_dtypes
def test_barlow_twins_gradient_on_a_nearly_collapsed_dimension_stays_bounded(dtype):
    """Dimension 3 has std 1e-7 in both views: the eps bounds its gradient, equal to lightly's; the
    exact correlation would divide by that std and push the dimension 1e6 times harder."""
    z1, z2 = embedding_pair(dtype)
    dead = 3
    generator = torch.Generator().manual_seed(5)
    z1[:, dead] *= 1e-7
    z2[:, dead] = z1[:, dead] + 1e-7 * torch.randn(BATCH, generator=generator, dtype=dtype)
    ours = loss_and_gradients(lambda a, b: barlow_twins_loss(a, b, LAMBDA), z1, z2)[1][0]
    theirs = loss_and_gradients(BarlowTwinsLoss(LAMBDA), z1, z2)[1][0]
    exact = loss_and_gradients(exact_correlation_loss, z1, z2)[1][0]
    assert torch.isfinite(ours).all()
    assert_matches(ours, theirs, tolerance(dtype, computes_in_fp64=True))
    # Of the order of the healthy dimensions' gradient, not 1e4.
    healthy = ours[:, [d for d in range(DIM) if d != dead]].abs().max()
    assert ours[:, dead].abs().max() < 10 * healthy
    assert exact[:, dead].abs().max() > 1e4 * ours[:, dead].abs().max()


@over_dtypes
def test_moco_info_nce_with_a_queue_equals_lightly_ntxent_with_its_memory_bank(dtype):
    """One direction, query q against its key and the queue's K negatives. Our MoCo v2 averages the two
    directions, both against the queue as it was before the step; lightly would enqueue between them."""
    negatives = initial_queue(dtype)
    # Gradients w.r.t. the embeddings before normalisation: MoCoV2 normalises them, lightly's loss too.
    ours = loss_and_gradients(lambda q, k: moco_direction(q, k, negatives), *embedding_pair(dtype))
    theirs = loss_and_gradients(moco_memory_bank(negatives), *embedding_pair(dtype))
    assert_matches(ours[0], theirs[0], tolerance(dtype))
    assert_matches(ours[1], theirs[1], tolerance(dtype))


def test_moco_queue_fills_like_lightly_memory_bank_step_by_step():
    """Each step enqueues the step's keys after the oldest: with K a multiple of the batch (as MoCo's
    code asserts) our KeyQueue and lightly's bank hold the same keys in the same slots, wrapping too."""
    batch = 32  # QUEUE / 4: five steps wrap around once
    initial = initial_queue(torch.float32, seed=4)
    queue, lightly_loss = our_queue(initial), moco_memory_bank(initial)
    for step in range(5):
        q, k = (F.normalize(z, dim=1) for z in embedding_pair(torch.float32, seed=10 + step, batch=batch))
        lightly_loss(q.requires_grad_(), k)  # enqueues k when the query needs a gradient
        queue.enqueue(k)
        torch.testing.assert_close(queue.keys, lightly_loss.memory_bank.bank, rtol=1e-6, atol=1e-7)
        assert queue.position.item() == lightly_loss.memory_bank.bank_ptr.item() == (step + 1) * batch % QUEUE
    assert not torch.allclose(queue.keys, initial)


def test_moco_queue_wraps_where_lightly_bank_drops_the_overflow():
    """Documented difference (K = 5, batches of 3): lightly writes the slots left and restarts at 0,
    discarding the batch's last key; our ring buffer writes it into slot 0, the oldest."""
    initial = torch.eye(5, 2)
    queue, lightly_loss = our_queue(initial), moco_memory_bank(initial)
    batches = []
    for seed in (20, 21):
        q, k = (F.normalize(z, dim=1) for z in embedding_pair(torch.float32, seed=seed, batch=3, dim=2))
        lightly_loss(q.requires_grad_(), k)
        queue.enqueue(k)
        batches.append(k)
    bank = lightly_loss.memory_bank.bank
    torch.testing.assert_close(queue.keys[1:], bank[1:], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(queue.keys[0], batches[1][2])  # ours: the second batch's last key
    torch.testing.assert_close(bank[0], batches[0][0])  # lightly: still the first batch's first key
    assert queue.position.item() == 1 and lightly_loss.memory_bank.bank_ptr.item() == 0


# ---- two gloo processes --------------------------------------------------------------------------

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def global_batch(dtype):
    """(W B, D) twice, rank 0's rows first. Rank 1's shard is shifted and stretched, so its batch
    statistics differ from rank 0's and from the global batch's (what tells Barlow Twins' gathers apart)."""
    z1, z2 = embedding_pair(dtype)
    shard = torch.arange(len(z1)) >= len(z1) // WORLD_SIZE
    stretch = torch.linspace(0.5, 3.0, DIM, dtype=dtype)
    return tuple(torch.where(shard[:, None], z * stretch + 2.0, z) for z in (z1, z2))


def distributed_pairs(queue_keys):
    """name -> (ours, lightly's): loss functions of this rank's shard (z1, z2) under DDP."""
    def gathered(loss):
        return lambda a, b: loss(gather_from_all_ranks(a), gather_from_all_ranks(b))
    return {
        "simclr": (gathered(lambda a, b: nt_xent(a, b, SIMCLR_TEMPERATURE).to(a.dtype)),
                   NTXentLoss(SIMCLR_TEMPERATURE, gather_distributed=True)),
        "vicreg": (gathered(lambda a, b: vicreg_loss(a, b, *VICREG_WEIGHTS).to(a.dtype)),
                   VICRegLoss(*VICREG_WEIGHTS, gather_distributed=True)),
        "barlow_twins": (gathered(lambda a, b: barlow_twins_loss(a, b, LAMBDA)),
                         BarlowTwinsLoss(LAMBDA, gather_distributed=True)),
        # MoCo: the loss needs no gather (per query, against the shared queue); the enqueue does.
        "moco_v2": (lambda q, k: moco_direction(q, k, queue_keys),
                    moco_memory_bank(queue_keys, distributed=True)),
    }


def distributed_rank(rank, port, out_dir):
    """One rank: our losses and lightly's on its shard, their input gradients, and MoCo's queues after
    one step; saved for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for dtype in DTYPES:
            shards = [z.chunk(WORLD_SIZE)[rank] for z in global_batch(dtype)]
            queue_keys = initial_queue(dtype)
            pairs = distributed_pairs(queue_keys)
            results[str(dtype)] = {name: {"ours": loss_and_gradients(ours, *shards),
                                          "lightly": loss_and_gradients(theirs, *shards)}
                                   for name, (ours, theirs) in pairs.items()}
            queue = our_queue(queue_keys)
            queue.enqueue(gather_without_gradient(F.normalize(shards[1], dim=1)))  # as MoCoV2.forward
            results[str(dtype)]["moco_v2"]["queue"] = queue.keys
            results[str(dtype)]["moco_v2"]["bank"] = pairs["moco_v2"][1].memory_bank.bank
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """One spawn of two gloo ranks for every distributed test: [rank][dtype][objective]."""
    out_dir = tmp_path_factory.mktemp("peer_ddp")
    mp.spawn(distributed_rank, args=(free_port(), out_dir), nprocs=WORLD_SIZE)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def single_process(loss_fn, dtype):
    """The loss on the whole global batch in one process, and the gradient of each rank's rows."""
    loss, grads = loss_and_gradients(loss_fn, *global_batch(dtype))
    return loss, [[grad.chunk(WORLD_SIZE)[rank] for grad in grads] for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name, our_loss", [
    pytest.param("simclr", lambda a, b: nt_xent(a, b, SIMCLR_TEMPERATURE).to(a.dtype), id="simclr"),
    pytest.param("vicreg", lambda a, b: vicreg_loss(a, b, *VICREG_WEIGHTS).to(a.dtype), id="vicreg"),
])
@over_dtypes
def test_gathered_losses_under_ddp_equal_lightly_and_the_single_process_loss(distributed_results, dtype,
                                                                            name, our_loss):
    """Every rank computes our global-batch loss; lightly's is over the rank's own anchors (SimCLR) or
    own invariance term (VICReg), so ours is the mean of lightly's over the ranks. Input gradients are
    equal per rank: both gathers all-reduce it (lightly since PR 1531), giving W x the single-process
    gradient of the rank's rows, which DDP's average brings back to it."""
    ranks = [result[str(dtype)][name] for result in distributed_results]
    reference_loss, reference_grads = single_process(our_loss, dtype)
    lightly_mean = sum(rank["lightly"][0] for rank in ranks) / WORLD_SIZE
    for rank, result in enumerate(ranks):
        assert_matches(result["ours"][0], reference_loss, tolerance(dtype))
        assert_matches(result["ours"][0], lightly_mean, tolerance(dtype))
        assert_matches(result["ours"][1], result["lightly"][1], tolerance(dtype))
        assert_matches(result["ours"][1], [WORLD_SIZE * grad for grad in reference_grads[rank]], tolerance(dtype))


def correlation_loss(correlation):
    off_diagonal = correlation - torch.diag(correlation.diagonal())
    return (1 - correlation.diagonal()).pow(2).sum() + LAMBDA * off_diagonal.pow(2).sum()


@over_dtypes
def test_barlow_twins_under_ddp_standardises_over_the_global_batch(distributed_results, dtype):
    """Ours on 2 ranks is the single-process loss of the global batch (= lightly's without DDP) with W x
    its gradient per rank, as the authors' SyncBatchNorm gives. Lightly's gather_distributed averages the
    ranks' correlation matrices, each standardised with its own shard's statistics (its issue 1977 fixed
    the gradient scale, not this): with shards of different statistics the losses differ."""
    tol = tolerance(dtype, computes_in_fp64=True)
    ranks = [result[str(dtype)]["barlow_twins"] for result in distributed_results]
    reference_loss, reference_grads = single_process(lambda a, b: barlow_twins_loss(a, b, LAMBDA), dtype)
    assert_matches(reference_loss, BarlowTwinsLoss(LAMBDA)(*global_batch(dtype)), tol)
    shards = [[z.chunk(WORLD_SIZE)[rank] for z in global_batch(dtype)] for rank in range(WORLD_SIZE)]
    local_statistics_loss = correlation_loss(sum(cross_correlation(*shard) for shard in shards) / WORLD_SIZE)
    for rank, result in enumerate(ranks):
        assert_matches(result["ours"][0], reference_loss, tol)
        assert_matches(result["ours"][1], [WORLD_SIZE * grad for grad in reference_grads[rank]], tol)
        assert_matches(result["lightly"][0], local_statistics_loss, tol)
    # About 45% here: the shift between the shards correlates every pair of dimensions of the global
    # batch, which per-shard standardisation cannot see.
    assert (ranks[0]["lightly"][0] - reference_loss).abs() > 0.2 * reference_loss


@over_dtypes
def test_moco_under_ddp_equals_lightly_and_both_queues_hold_the_global_keys_rank_0_first(distributed_results,
                                                                                         dtype):
    ranks = [result[str(dtype)]["moco_v2"] for result in distributed_results]
    keys = F.normalize(global_batch(dtype)[1], dim=1)  # every rank's keys, rank 0's first
    for result in ranks:
        assert_matches(result["ours"][0], result["lightly"][0], tolerance(dtype))
        assert_matches(result["ours"][1], result["lightly"][1], tolerance(dtype))
        torch.testing.assert_close(result["queue"][:len(keys)], keys, rtol=0, atol=0)
        torch.testing.assert_close(result["bank"], result["queue"], rtol=1e-6, atol=1e-7)
        # The older slots still hold the initial keys.
        torch.testing.assert_close(result["queue"][len(keys):], initial_queue(dtype)[len(keys):], rtol=0, atol=0)
