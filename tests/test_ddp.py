"""AR-ELBO under data parallelism: 2 CPU processes (gloo), DistributedDataParallel, each rank half of a fixed global
batch. The policies all-reduce the sums that make sigma2 (detached), and DDP averages the gradients of the
detached-MLE loss: both must equal the single-process full-batch values exactly (float64, same noise)."""

import contextlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from arelbo.config import ModelConfig
from arelbo.models import build_model
from arelbo.objectives import GaussianVAELoss

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 2
BATCH = 8  # global batch, split 4 + 4
SHAPE = (1, 8, 8)
LATENT = 3
STEPS = 2  # two SGD steps: the second checks that parameters (and the ar-ema state) stayed in sync
POLICIES = [("ar", {}), ("ar-diagonal", {}), ("ar-ema", {"momentum": 0.5}), ("ar-per-sample", {}), ("fixed", {"sigma2": 0.3}),
            ("ar-annealed", {"anneal_steps": 2, "anneal_from": 0.2}),  # step 0: the floor binds; step 1: the MLE
            ("ar-conditional", {}), ("learned-conditional", {"init_sigma2": 0.5})]  # sigma2(z): a variance head


class _WithNoise(nn.Module):
    """The VAE's reparameterised pass with the noise passed in, so both sides use the same eps."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        mu, logvar = self.vae.encode(x)
        return self.vae.decode_with_logvar(mu + eps * (0.5 * logvar).exp()), mu, logvar


def _model(name):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="conv", latent_dim=LATENT, hidden=[4, 8], kernel_size=4, out_activation="sigmoid",
                      variance_head=name.endswith("-conditional"))
    return _WithNoise(build_model(cfg, SHAPE)).double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(STEPS, BATCH, *SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(STEPS, BATCH, LATENT, generator=g, dtype=torch.float64)
    return xs, eps


def _train(net, xs, eps, name, kwargs, rows=slice(None)):
    """STEPS SGD steps on the given rows of each batch; returns per step (sigma2, neg_elbo, loss, grads)."""
    loss_fn = GaussianVAELoss(name, **kwargs).double()
    loss_fn.attach(getattr(net, "module", net).vae)  # e.g. a variance head's initial value (the same on every rank)
    record = []
    for step in range(STEPS):
        x = xs[step, rows]
        net.zero_grad(set_to_none=True)
        decoded, mu, logvar = net(x, eps[step, rows])
        out = loss_fn(x, decoded.mean, mu, logvar, x_logvar=decoded.logvar)
        out.loss.backward()
        grads = [p.grad.detach().clone() for p in net.parameters()]
        record.append((out.sigma2.clone(), out.neg_elbo.detach().clone(), grads))
        with torch.no_grad():  # plain SGD by hand: torch.optim's first use imports torch._dynamo (seconds per process)
            for p in net.parameters():
                p.sub_(0.5 * p.grad)
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    return record, state


@contextlib.contextmanager
def gloo_rank(rank, port, **init_args):
    """One rank of a spawned 2-process gloo group, one torch thread. After the body: a barrier (neither rank closes
    its connections while the other still uses them), the group destroyed, and the process ended with os._exit(0):
    interpreter teardown, after the results are saved, is where gloo's threads can abort it (SIGABRT). A failing
    body destroys the group and raises as usual."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, **init_args)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _worker(rank, port, path):
    from torch.nn.parallel import DistributedDataParallel

    with gloo_rank(rank, port):
        xs, eps = _inputs()
        half = BATCH // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        results = {}
        for name, kwargs in POLICIES:
            net = DistributedDataParallel(_model(name))
            results[name] = _train(net, xs, eps, name, kwargs, rows)
        torch.save(results, f"{path}.{rank}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ddp") / "out")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    return [torch.load(f"{path}.{r}") for r in range(WORLD)]


@pytest.mark.parametrize("name, kwargs", POLICIES, ids=[p[0] for p in POLICIES])
def test_ddp_equals_single_process_full_batch(ddp_results, name, kwargs):
    xs, eps = _inputs()
    ref, ref_state = _train(_model(name), xs, eps, name, kwargs)
    half = BATCH // WORLD
    for rank, results in enumerate(ddp_results):
        record, state = results[name]
        for step, ((s2, _neg_elbo, grads), (s2_ref, _neg_elbo_ref, grads_ref)) in enumerate(zip(record, ref)):
            if s2_ref.shape[:1] == (BATCH,):  # per sample (ar-per-sample, sigma2(z)): local by design, each rank its own
                s2_ref = s2_ref[rank * half : (rank + 1) * half]
            torch.testing.assert_close(s2, s2_ref, rtol=1e-13, atol=0, msg=f"{name} rank {rank} step {step} sigma2")
            for g, g_ref in zip(grads, grads_ref):
                torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14, msg=f"{name} rank {rank} step {step} grad")
        # The reported -ELBO is each rank's batch mean at the shared sigma2; the two halves average to the full one.
        if rank == 0:
            other = ddp_results[1][name][0]
            for (_, a, _), (_, b, _), (_, full, _) in zip(record, other, ref):
                torch.testing.assert_close((a + b) / 2, full, rtol=1e-13, atol=0)
        for key, value in ref_state.items():  # ar-ema: the running value resumes identically on every rank
            torch.testing.assert_close(state[key], value, rtol=1e-13, atol=0)


AR_POLICIES = [("ar", {}), ("ar-diagonal", {}), ("ar-ema", {"momentum": 0.5})]


def _local_values(name, kwargs, x, x_hat, **loss_args):
    loss_fn = GaussianVAELoss(name, **kwargs, **loss_args).double()
    out = loss_fn(x, x_hat, torch.zeros(len(x), 2, dtype=torch.float64), torch.zeros(len(x), 2, dtype=torch.float64))
    return out.sigma2, out.neg_elbo


def _subset_worker(rank, port, path):
    """Only rank 0 calls the loss (rank-0 validation): with all_reduce=False, or with a group of rank 0 alone.
    Without the opt-out the ar* policies would wait for rank 1 in an all-reduce it never joins."""
    import datetime

    import torch.distributed as dist

    with gloo_rank(rank, port, timeout=datetime.timedelta(seconds=20)):
        alone = dist.new_group([0])  # every rank must take part in creating a group
        if rank == 0:
            xs, _ = _inputs()
            x = xs[0].flatten(1)
            results = {name: (_local_values(name, kwargs, x, 0.5 * x, all_reduce=False),
                              _local_values(name, kwargs, x, 0.5 * x, process_group=alone))
                       for name, kwargs in AR_POLICIES}
            torch.save(results, path)


def test_loss_on_a_subset_of_ranks_does_not_wait_for_the_others(tmp_path):
    path = str(tmp_path / "subset")
    mp.spawn(_subset_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    results = torch.load(path)
    xs, _ = _inputs()
    x = xs[0].flatten(1)
    for name, kwargs in AR_POLICIES:
        ref = _local_values(name, kwargs, x, 0.5 * x)  # single process: nothing to reduce
        for got in results[name]:
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
