import torch

from diffusers_fastgen.losses.scm import scm_loss
from diffusers_fastgen.models.logvar import LogVarHead


def test_logvar_head_learns_log_of_the_mean_loss_per_time():
    """Minimising loss e^(-u(t)) + u(t) drives u(t) to log E[loss | t]: two time bins with constant
    losses 0.25 and 4.0 must give u = log 0.25 and log 4."""
    head = LogVarHead(num_features=16, scale=4.0)
    assert torch.equal(head(torch.rand(5)), torch.zeros(5))  # starts at unit weight
    t = torch.tensor([0.1, 0.8]).repeat(32)
    target = torch.tensor([0.25, 4.0]).repeat(32)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(600):
        u = head(t)
        (target * torch.exp(-u) + u).mean().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(head(torch.tensor([0.1, 0.8])), torch.log(torch.tensor([0.25, 4.0])), rtol=0, atol=0.05)


def test_logvar_plugs_into_scm_loss():
    head = LogVarHead(8)
    x, t = torch.randn(2, 3), torch.tensor([0.3, 1.0])
    loss, aux = scm_loss(lambda y, tt: 0.5 * y, x, t, torch.randn(2, 3), sigma_d=0.5, logvar=head(t))
    loss.sum().backward()
    assert head.linear.weight.grad is not None and torch.isfinite(loss).all()
