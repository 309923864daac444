"""Distillation losses: each one's formula, its zero, and that it can tell good from bad."""

import math

import pytest
import torch
import torch.nn.functional as F

from graphopt.distill.losses import ICDLoss, MCADiscriminator, MCALoss, OutputLoss, RouterBudgetLoss
from graphopt.errors import GraphoptError


def _features(seed: int, shapes=((2, 4, 16, 8), (2, 4, 16, 12))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def test_output_loss_is_mse_and_checks_shapes():
    a, b = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 4, 2, 8, 8)
    assert OutputLoss()(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    assert OutputLoss()(a, a).item() == 0.0
    with pytest.raises(GraphoptError, match="differ in shape"):
        OutputLoss()(a, b[:, :2])


def test_icd_zero_for_identical_and_grows_monotonically_with_a_frame_perturbation():
    teacher = _features(0)
    icd = ICDLoss()
    assert icd([t.clone() for t in teacher], teacher).item() == 0.0
    direction = _features(1)
    values = []
    for scale in (0.01, 0.05, 0.2, 0.5, 1.0, 2.0):
        student = [t.clone() for t in teacher]
        for s, d in zip(student, direction):
            s[:, 2] += scale * d[:, 2]  # only frame 2 moves
        values.append(icd(student, teacher).item())
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 0


def test_icd_formula_is_per_frame_relative_and_scale_free():
    teacher = _features(2)
    zeros = [torch.zeros_like(t) for t in teacher]
    # A zero student has relative squared error ≈ 1 in every frame of every layer.
    assert ICDLoss()(zeros, teacher).item() == pytest.approx(1.0, rel=1e-4)
    student = [t + 0.3 * d for t, d in zip(teacher, _features(3))]
    expected = torch.stack([
        ((s - t) ** 2).sum(dim=(2, 3)).div((t**2).sum(dim=(2, 3)) + 1e-6 * t.shape[2] * t.shape[3]).mean()
        for s, t in zip(student, teacher)
    ]).mean()
    assert ICDLoss()(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    # Layers weigh alike: scaling one layer's features (teacher and student) by 100 changes nothing.
    scaled = ICDLoss()([student[0] * 100, student[1]], [teacher[0] * 100, teacher[1]]).item()
    assert scaled == pytest.approx(expected.item(), rel=1e-4)


def test_icd_rejects_unmatched_taps():
    teacher = _features(0)
    with pytest.raises(GraphoptError, match="feature taps"):
        ICDLoss()(teacher[:1], teacher)
    with pytest.raises(GraphoptError, match="tap 1"):
        ICDLoss()([teacher[0], teacher[1][:, :2]], teacher)


def _toy_clips(batch: int, generator: torch.Generator, frames=6, tokens=8, dim=8) -> torch.Tensor:
    """Content moving at constant velocity: x_f = base + f·v (+ a little noise)."""
    base = torch.randn(batch, 1, tokens, dim, generator=generator)
    velocity = 0.5 * torch.randn(batch, 1, tokens, dim, generator=generator)
    steps = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1) - frames / 2
    return base + steps * velocity + 0.05 * torch.randn(batch, frames, tokens, dim, generator=generator)


def _shuffle_frames(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    out = clips.clone()
    frames = clips.shape[1]
    for b in range(clips.shape[0]):
        perm = torch.randperm(frames, generator=generator)
        while torch.equal(perm, torch.arange(frames)):
            perm = torch.randperm(frames, generator=generator)
        out[b] = clips[b, perm]
    return out


def test_mca_discriminator_learns_to_separate_shuffled_clips_from_real_ones():
    """Each shuffled frame looks exactly like a real one; only the temporal head can tell them apart."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    disc = MCADiscriminator([8], hidden_dim=32, noise_embed_dim=16)
    mca = MCALoss()
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.0, 0.99))
    for _ in range(150):
        real = _toy_clips(32, g)
        fake = _shuffle_frames(real, g)
        noise = torch.rand(32, generator=g)
        loss = mca.discriminator_loss(disc, [real], [fake], noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = torch.Generator().manual_seed(123)
    real = _toy_clips(200, held_out)
    fake = _shuffle_frames(real, held_out)
    noise = torch.rand(200, generator=held_out)
    with torch.no_grad():
        score_real = disc([real], noise).mean(dim=(1, 2, 3))
        score_fake = disc([fake], noise).mean(dim=(1, 2, 3))
    accuracy = ((score_real > 0).float().mean() + (score_fake < 0).float().mean()).item() / 2
    assert accuracy >= 0.9, accuracy
    # The frame-mean of the spatial head cannot see order, so the temporal head did the separating.
    with torch.no_grad():
        spatial_real = disc([real], noise)[:, :, 0].mean(dim=(1, 2))
        spatial_fake = disc([fake], noise)[:, :, 0].mean(dim=(1, 2))
    torch.testing.assert_close(spatial_real, spatial_fake, rtol=1e-4, atol=1e-5)


def test_mca_losses_follow_the_hinge_formulas_and_route_gradients():
    torch.manual_seed(0)
    disc = MCADiscriminator([8, 12], hidden_dim=16, noise_embed_dim=8)
    teacher = _features(0)
    student = [f.requires_grad_() for f in _features(1)]
    noise = torch.rand(2)
    mca = MCALoss()
    logits = disc(student, noise)
    assert logits.shape == (2, 2, 2, 4)  # (batch, judged taps, heads, frames)
    d_loss = mca.discriminator_loss(disc, teacher, student, noise)
    expected = F.relu(1 + disc(student, noise)).mean() + F.relu(1 - disc(teacher, noise)).mean()
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    d_loss.backward()
    assert all(f.grad is None for f in student)  # D's loss never trains the student
    g_loss = mca(disc, student, noise)
    assert g_loss.item() == pytest.approx(-disc(student, noise).mean().item(), rel=1e-6)
    g_loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student)


def test_mca_discriminator_judges_only_the_chosen_taps():
    disc = MCADiscriminator([8, 12], hidden_dim=16, judged_taps=[1])
    assert disc(_features(0), torch.rand(2)).shape == (2, 1, 2, 4)
    with pytest.raises(GraphoptError, match="judged tap 2"):
        MCADiscriminator([8, 12], judged_taps=[2])


def test_router_budget_zero_at_target_and_quadratic_around_it():
    loss = RouterBudgetLoss(target=0.6)
    # The budget is on the batch mean: per-sample fractions may differ (adaptive routing).
    assert loss.budget(torch.tensor([0.4, 0.8, 0.6])).item() == pytest.approx(0.0, abs=1e-12)
    assert loss.budget(torch.tensor([0.9, 0.9])).item() == pytest.approx(0.09, rel=1e-5)
    assert loss.budget(torch.tensor([0.3, 0.3])).item() == pytest.approx(0.09, rel=1e-5)
    with pytest.raises(GraphoptError, match="target"):
        RouterBudgetLoss(target=1.5)


def test_router_balance_penalises_collapsed_block_usage_only():
    loss = RouterBudgetLoss(target=0.5)
    # Confident but mixed per-sample decisions: every block runs for half the batch -> 0.
    mixed = torch.tensor([[0.99, 0.01], [0.01, 0.99]])
    assert loss.balance(mixed).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # block 0 always on, block 1 always off
    assert loss.balance(collapsed).item() == pytest.approx(math.log(2), rel=1e-3)
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.1]], requires_grad=True)
    loss.balance(probs).backward()
    assert (probs.grad[:, 0] > 0).all() and (probs.grad[:, 1] < 0).all()  # pushed back towards 0.5
    total = loss(torch.tensor([0.5, 0.5]), mixed, balance_weight=0.1)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
