"""torch_bridge in PyTorch Lightning: SOAP with automatic optimization (``configure_optimizers`` returns it;
Lightning calls ``step(closure)`` with a closure that runs forward and backward), and Sophia-G with manual
optimization (``opt.step(logits=logits)``: the keyword reaches ``torch_bridge.Sophia.step`` through
``LightningOptimizer.step``). A few CPU steps each; no logger, checkpoint or progress bar, files only under
pytest's tmp_path."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from torch_bridge import SOAP, Sophia

L = pytest.importorskip("lightning")

STEPS = 8


def _data(n=64, dim=6, classes=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=gen)
    y = (x @ torch.randn(dim, classes, generator=gen)).argmax(-1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


class _Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)


class SoapModule(_Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return SOAP(self.parameters(), lr=1e-2, precondition_frequency=2)


class SophiaGModule(_Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # only a refresh step backpropagates through the logits again
        self.manual_backward(loss, retain_graph=opt.optimizer.refreshes_next_step())
        opt.step(logits=logits)
        self.losses.append(loss.item())

    def configure_optimizers(self):
        return Sophia(self.parameters(), lr=1e-2, rho=0.05, k=2)


def _fit(module, tmp_path):
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, _data())
    return trainer


def test_soap_with_automatic_optimization(tmp_path):
    module = SoapModule()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _fit(module, tmp_path)
    opt = trainer.optimizers[0]
    assert isinstance(opt, SOAP) and trainer.global_step == STEPS
    assert all(int(opt.state[p]["step"]) == STEPS - 1 for p in module.parameters())  # the first call builds
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert module.losses[-1] < module.losses[0]


def test_sophia_g_with_manual_optimization(tmp_path):
    module = SophiaGModule()
    refreshes = []
    real_estimates = Sophia._gnb_estimates

    def counting(self, *args, **kwargs):
        refreshes.append(1)
        return real_estimates(self, *args, **kwargs)

    Sophia._gnb_estimates = counting
    try:
        trainer = _fit(module, tmp_path)
    finally:
        Sophia._gnb_estimates = real_estimates
    opt = trainer.optimizers[0]
    assert isinstance(opt, Sophia) and trainer.global_step == STEPS
    assert all(int(opt.state[p]["step"]) == STEPS for p in module.parameters())
    assert len(refreshes) == STEPS // 2  # k = 2: the logits reached step() and were used on every refresh
    assert all(bool(opt.state[p]["hessian_buffer"].abs().sum() > 0) for p in module.parameters())
    assert module.losses[-1] < module.losses[0]
