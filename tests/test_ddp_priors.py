"""Learnable priors under data parallelism: 2 CPU processes (gloo), DDP, each rank half of a fixed global batch,
the Monte-Carlo rate in the loss. The prior's parameters get DDP-averaged gradients that must equal the
single-process full-batch gradients exactly (float64, same noise), like every other weight."""

import pytest
import torch
import torch.multiprocessing as mp
from test_ddp import BATCH, LATENT, SHAPE, STEPS, WORLD, _free_port, _inputs, gloo_rank
from torch import nn

from arelbo.config import ModelConfig
from arelbo.models import build_model
from arelbo.objectives import GaussianVAELoss

pytestmark = pytest.mark.usefixtures("single_thread")

PRIORS = [("mog", {"components": 3}), ("vamp", {"components": 3}), ("flow", {"transforms": 2, "hidden": [8], "identity_init": False})]


class _WithNoise(nn.Module):
    """The reparameterised pass and the Monte-Carlo rate with the noise passed in, so both sides use the same eps."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        mu, logvar = self.vae.encode(x)
        z = mu + eps * (0.5 * logvar).exp()
        return self.vae.decode(z), mu, logvar, self.vae.rate(mu, logvar, z)


def _model(prior, options):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="conv", latent_dim=LATENT, hidden=[4, 8], kernel_size=4, out_activation="sigmoid",
                      prior=prior, prior_options=options)
    return _WithNoise(build_model(cfg, SHAPE)).double()


def _train(net, xs, eps, rows=slice(None)):
    loss_fn = GaussianVAELoss("ar").double()
    record = []
    for step in range(STEPS):
        x = xs[step, rows]
        net.zero_grad(set_to_none=True)
        x_hat, mu, logvar, rate = net(x, eps[step, rows])
        loss_fn(x, x_hat, mu, logvar, rate=rate).loss.backward()
        record.append([(name, p.grad.detach().clone()) for name, p in net.named_parameters()])
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.1 * p.grad)
    return record


def _worker(rank, port, path):
    from torch.nn.parallel import DistributedDataParallel

    with gloo_rank(rank, port):
        xs, eps = _inputs()
        half = BATCH // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        results = {name: _train(DistributedDataParallel(_model(name, options)), xs, eps, rows) for name, options in PRIORS}
        torch.save(results, f"{path}.{rank}")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ddp") / "out")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    return [torch.load(f"{path}.{r}") for r in range(WORLD)]


@pytest.mark.parametrize("name, options", PRIORS, ids=[p[0] for p in PRIORS])
def test_ddp_prior_gradients_equal_single_process(ddp_results, name, options):
    xs, eps = _inputs()
    ref = _train(_model(name, options), xs, eps)
    for rank, results in enumerate(ddp_results):
        for step, (grads, grads_ref) in enumerate(zip(results[name], ref)):
            names = [n for n, _ in grads_ref]
            assert any(".prior." in n for n in names)
            for (n, g), (n_ref, g_ref) in zip(grads, grads_ref):
                assert n == "module." + n_ref
                torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14, msg=f"{name} rank {rank} step {step} {n}")
