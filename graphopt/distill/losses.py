"""Distillation losses: output match, VDMini's ICD and MCA, PARE's router budget.

Feature taps are tensors of shape (batch, frames, tokens_per_frame, dim); teacher tap i and
student tap i describe the same place in the network. Every loss is computed in float32 whatever
the model's dtype, so bf16 training does not lose the small differences being matched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphopt.errors import GraphoptError


def _check_matched_features(teacher: list[Tensor], student: list[Tensor]) -> None:
    if len(teacher) != len(student):
        raise GraphoptError(
            f"teacher has {len(teacher)} feature taps but the student has {len(student)}: "
            "the pair must return matched lists (teacher tap i <-> student tap i)"
        )
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.ndim != 4 or t.shape != s.shape:
            raise GraphoptError(
                f"feature tap {i}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}; both must be "
                "(batch, frames, tokens_per_frame, dim) with the same shape"
            )


class OutputLoss(nn.Module):
    """L_out = mean((ŷ_student − ŷ_teacher)²) over every element, both predictions made at the same
    noisy input (flow-matching velocity or noise, whatever the model predicts)."""

    def forward(self, student_pred: Tensor, teacher_pred: Tensor) -> Tensor:
        if student_pred.shape != teacher_pred.shape:
            raise GraphoptError(
                f"student prediction {tuple(student_pred.shape)} and teacher prediction "
                f"{tuple(teacher_pred.shape)} differ in shape; the student must keep the output layout"
            )
        return F.mse_loss(student_pred.float(), teacher_pred.detach().float())


class ICDLoss(nn.Module):
    """Individual Content Distillation (VDMini): per-frame feature consistency.

    For tap l, sample b, frame f, with S, T the student and teacher features of that frame
    (tokens_per_frame × dim values):

        ICD = 1/L Σ_l  1/(B·F) Σ_{b,f}  ‖S_{l,b,f} − T_{l,b,f}‖₂² / (‖T_{l,b,f}‖₂² + ε·n)

    where n = tokens_per_frame·dim. Each frame's squared L2 distance is divided by that frame's
    own teacher energy (detached), so every layer and every frame weighs alike whatever the
    feature scale (residual-stream norms grow with depth in DiTs), and a frame with little
    content is not drowned by a busy one. ε·n keeps near-zero teacher frames finite. The value is
    a relative squared error: 0 for identical features, 1 when the student's frame is zero.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
        _check_matched_features(teacher_features, student_features)
        if not student_features:
            raise GraphoptError("ICD needs at least one feature tap; the pair returned none")
        per_layer = []
        for s, t in zip(student_features, teacher_features):
            t = t.detach().float()
            distance = (s.float() - t).pow(2).sum(dim=(2, 3))  # (B, F)
            energy = t.pow(2).sum(dim=(2, 3)) + self.eps * t.shape[2] * t.shape[3]
            per_layer.append((distance / energy).mean())
        return torch.stack(per_layer).mean()


def _sinusoidal_embedding(values: Tensor, dim: int) -> Tensor:
    """[sin(v·ω_k), cos(v·ω_k)] with ω_k log-spaced from 1 to 1000; v in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=values.device))
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _LayerCritic(nn.Module):
    """The two heads of the discriminator for one feature tap (see MCADiscriminator)."""

    def __init__(self, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.proj_in = nn.Linear(feature_dim, hidden_dim)
        self.spatial = nn.Linear(hidden_dim, hidden_dim)
        self.spatial_out = nn.Linear(hidden_dim, 1)
        self.temporal1 = nn.Conv1d(hidden_dim, hidden_dim, kernel_size=3, padding=1)
        self.temporal2 = nn.Conv1d(hidden_dim, hidden_dim, kernel_size=3, padding=1)
        self.temporal_out = nn.Linear(hidden_dim, 1)

    def forward(self, features: Tensor, film_scale: Tensor, film_shift: Tensor) -> Tensor:
        batch, frames, tokens, _ = features.shape
        h = F.gelu(self.proj_in(self.norm(features.float())))  # (B, F, T, H)
        h = h * (1 + film_scale[:, None, None, :]) + film_shift[:, None, None, :]
        spatial = self.spatial_out(F.gelu(self.spatial(h)).mean(dim=2)).squeeze(-1)  # (B, F)
        # Each token position's trajectory over frames; DiT features already mix spatial context
        # through attention, so a token's change from frame to frame carries local motion.
        seq = h.permute(0, 2, 3, 1).reshape(batch * tokens, -1, frames)  # (B·T, H, F)
        seq = F.gelu(self.temporal2(F.gelu(self.temporal1(seq))))
        seq = seq.reshape(batch, tokens, -1, frames).mean(dim=1)  # (B, H, F)
        temporal = self.temporal_out(seq.transpose(1, 2)).squeeze(-1)  # (B, F)
        return torch.stack([spatial, temporal], dim=1)  # (B, 2, F)


class MCADiscriminator(nn.Module):
    """Multi-frame Content Adversarial discriminator (VDMini), one critic per judged feature tap.

    For features f (B, F, T, D) and noise level σ (B,) in [0, 1]:
        h = GELU(W_in·LayerNorm(f)) ⊙ (1 + γ(σ)) + β(σ)                     (B, F, T, H)
        spatial head:  s_{b,f} = w_s · mean_t GELU(W h_{b,f,t})             one logit per frame,
                       judging each frame's content alone;
        temporal head: per token position, Conv1d(k=3) → GELU → Conv1d(k=3) → GELU over the frame
                       axis, mean over tokens, linear → τ_{b,f}             one logit per frame,
                       judging how content changes across neighbouring frames (motion);
    γ, β come from an MLP on a sinusoidal embedding of σ whose last layer starts at zero, so
    conditioning begins as the identity. forward returns logits (B, n_judged_taps, 2, F):
    [..., 0, :] spatial, [..., 1, :] temporal. Higher means "looks like the teacher".
    """

    def __init__(
        self,
        feature_dims: list[int],
        *,
        hidden_dim: int = 128,
        noise_embed_dim: int = 64,
        judged_taps: list[int] | None = None,
    ):
        super().__init__()
        if not feature_dims:
            raise GraphoptError("MCADiscriminator needs the dims of at least one feature tap")
        self.judged_taps = list(range(len(feature_dims))) if judged_taps is None else list(judged_taps)
        for tap in self.judged_taps:
            if not 0 <= tap < len(feature_dims):
                raise GraphoptError(
                    f"judged tap {tap} does not exist: the pair has {len(feature_dims)} feature taps "
                    f"(allowed: 0..{len(feature_dims) - 1})"
                )
        self.noise_embed_dim = noise_embed_dim
        self.noise_mlp = nn.Sequential(
            nn.Linear(noise_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim)
        )
        nn.init.zeros_(self.noise_mlp[2].weight)
        nn.init.zeros_(self.noise_mlp[2].bias)
        self.critics = nn.ModuleList(_LayerCritic(feature_dims[tap], hidden_dim) for tap in self.judged_taps)

    def forward(self, features: list[Tensor], noise_level: Tensor) -> Tensor:
        film = self.noise_mlp(_sinusoidal_embedding(noise_level, self.noise_embed_dim))
        film_scale, film_shift = film.chunk(2, dim=1)
        return torch.stack(
            [critic(features[tap], film_scale, film_shift) for tap, critic in zip(self.judged_taps, self.critics)],
            dim=1,
        )


class MCALoss(nn.Module):
    """Hinge losses of the MCA game; teacher features are real, student features fake.

    Discriminator:  L_D = E[max(0, 1 + D(f_stu))] + E[max(0, 1 − D(f_tea))]
    Student:        L_G = −E[D(f_stu)]
    E averages over samples, judged taps, both heads and frames, so each head weighs alike.
    forward(...) is L_G; call it with D's parameters frozen (the trainer does) so only the student
    learns from it.
    """

    def forward(self, discriminator: nn.Module, student_features: list[Tensor], noise_level: Tensor) -> Tensor:
        return -discriminator(student_features, noise_level).mean()

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        teacher_features: list[Tensor],
        student_features: list[Tensor],
        noise_level: Tensor,
    ) -> Tensor:
        _check_matched_features(teacher_features, student_features)
        fake = discriminator([f.detach() for f in student_features], noise_level)
        real = discriminator([f.detach() for f in teacher_features], noise_level)
        return F.relu(1 + fake).mean() + F.relu(1 - real).mean()


class RouterBudgetLoss(nn.Module):
    """Pulls the expected executed fraction to the target and keeps the router from collapsing.

        budget  = (mean_b e_b − ρ)²
        balance = mean_k (log 2 − H(p̄_k)),  p̄_k = mean_b p_{b,k},  H(p) = −p log p − (1−p) log(1−p)

    e_b: expected executed fraction (FLOPs-weighted) of sample b; ρ: target; p_{b,k}: keep
    probability of routed block k for sample b. The budget is on the batch mean, so single samples
    (say, early vs late timesteps) may spend more or less than ρ: that is the adaptivity routing is
    for.

    Anti-collapse (ours; the papers do not publish one): `balance` is the batch-level load term of
    MoE load balancing (Switch Transformer), in binary-entropy form. It is 0 when every block runs
    for half the batch and reaches log 2 when a block is always on or always off across the batch,
    so it only fights a block whose *batch usage* saturates, not confident per-sample decisions.
    The trainer scales it by a weight that decays linearly to zero over the first part of stage 2:
    early it keeps gradients flowing through every gate while the router is still random; later
    the budget and the distillation losses alone decide which blocks are always kept.
    """

    def __init__(self, target: float, eps: float = 1e-6):
        super().__init__()
        if not 0.0 < target <= 1.0:
            raise GraphoptError(f"router budget target = {target}: must be in (0, 1] (executed fraction)")
        self.target = target
        self.eps = eps

    def budget(self, exec_fraction: Tensor) -> Tensor:
        return (exec_fraction.float().mean() - self.target) ** 2

    def balance(self, gate_probs: Tensor) -> Tensor:
        usage = gate_probs.float().mean(dim=0).clamp(self.eps, 1 - self.eps)
        entropy = -(usage * usage.log() + (1 - usage) * (1 - usage).log())
        return (math.log(2.0) - entropy).mean()

    def forward(self, exec_fraction: Tensor, gate_probs: Tensor | None, balance_weight: float = 0.0) -> Tensor:
        loss = self.budget(exec_fraction)
        if balance_weight > 0.0 and gate_probs is not None:
            loss = loss + balance_weight * self.balance(gate_probs)
        return loss
