"""DINOv2's losses: DINO (class token), iBOT (masked patch tokens) and KoLeo.

Names, signatures and semantics are DINOv2's (``dinov2/loss/``), so code written
against the reference reads the same:

* the teacher's outputs are centred and sharpened either by a running centre
  (``softmax_center_teacher``) or by Sinkhorn-Knopp (``sinkhorn_knopp_teacher``);
* ``update_center(t)`` only *starts* the centre update (an asynchronous all-reduce
  under DDP); it is applied by the next ``softmax_center_teacher`` call, so step k's
  teacher is centred with the centre as it stood after step k-1's update;
* every collective is skipped without a process group, so the losses work in a single
  process, and under DDP they all-reduce exactly where the reference does.

A pending centre update is part of the module's state (``get_extra_state``), so a
checkpoint taken between ``update_center`` and the next step resumes exactly.

Notation: B samples, K prototypes, N patch tokens per sample, M masked tokens in total.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from histoscope.pretrain import distributed

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss", "sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, total_samples, n_iterations: int = 3
                   ) -> torch.Tensor:
    """Sinkhorn-Knopp assignment of (B, K) teacher logits, rows summed over all processes.

    ``total_samples``: B summed over processes (an int or a (1,) tensor).
    Returns (B, K) whose rows sum to 1 and whose columns are balanced across prototypes.
    """
    teacher_output = teacher_output.float()
    q = torch.exp(teacher_output / teacher_temp).t()  # (K, B), the paper's notation
    prototypes = q.shape[0]
    sum_q = torch.sum(q)
    distributed.all_reduce(sum_q)
    q /= sum_q
    for _ in range(n_iterations):
        # rows: every prototype gets total weight 1/K
        sum_of_rows = torch.sum(q, dim=1, keepdim=True)
        distributed.all_reduce(sum_of_rows)
        q /= sum_of_rows
        q /= prototypes
        # columns: every sample gets total weight 1/B
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= total_samples
    q *= total_samples  # columns sum to 1: an assignment per sample
    return q.t()


class _CenteredTeacher(nn.Module):
    """The running centre of teacher outputs, updated asynchronously as in DINOv2."""

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None  # summed over this batch (and over processes once reduced)
        self._center_count = None  # what the sum is divided by: local count x world size

    @torch.no_grad()
    def _start_center_update(self, batch_sum: torch.Tensor, count: int) -> None:
        self.updated = False
        self.async_batch_center = batch_sum
        self._center_count = count * distributed.world_size()
        self.reduce_handle = distributed.all_reduce(self.async_batch_center, async_op=True)

    def _wait(self) -> None:
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        if self.updated is False:
            self._wait()
            batch_center = self.async_batch_center / self._center_count
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            self.updated = True

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Apply the pending centre update, then softmax((t - centre) / teacher_temp)."""
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    def get_extra_state(self) -> dict:
        if self.updated:
            return {"pending": False}
        self._wait()
        return {"pending": True, "batch_center": self.async_batch_center.detach().clone(),
                "count": int(self._center_count)}

    def set_extra_state(self, state: dict) -> None:
        self.reduce_handle = None
        self.updated = not state["pending"]
        if state["pending"]:
            self.async_batch_center = state["batch_center"].to(self.center.device)
            self._center_count = state["count"]
        else:
            self.async_batch_center, self._center_count = None, None


class DINOLoss(_CenteredTeacher):
    """Cross-entropy between sharpened, centred teacher and student class-token prototypes.

    ``forward(student_list, teacher_list)`` sums ``-mean_b sum_k t log_softmax(s / student_temp)``
    over every (student, teacher) pair, as DINOv2 does (the caller divides by the number of
    terms).
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        """(B, K) teacher logits -> (B, K) Sinkhorn-Knopp assignments over all processes' B."""
        return sinkhorn_knopp(teacher_output, teacher_temp, teacher_output.shape[0] * distributed.world_size(),
                              n_iterations)

    def forward(self, student_output_list: Sequence[torch.Tensor],
                teacher_out_softmaxed_centered_list: Sequence[torch.Tensor]) -> torch.Tensor:
        total_loss = 0
        for s in student_output_list:  # (B, K) each
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:  # (B, K) each
                loss = torch.sum(t * lsm, dim=-1)
                total_loss -= loss.mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Start updating the centre with the batch mean of (B, K) teacher logits."""
        self._start_center_update(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))


class iBOTPatchLoss(_CenteredTeacher):  # noqa: N801  (the reference's name)
    """Cross-entropy between teacher and student prototypes of the masked patch tokens.

    Each image's masked tokens are averaged (weight 1 / its masked count), then images are
    averaged; images without masked tokens count in the denominator, as in DINOv2.
    """

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        """(M, K) masked-token logits -> (M, K) assignments; ``n_masked_patches_tensor`` (1,)
        is this process's M, summed over processes here (on a copy)."""
        total = n_masked_patches_tensor.clone()
        distributed.all_reduce(total)
        return sinkhorn_knopp(teacher_output, teacher_temp, total, n_iterations)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        """Dense form: ``student/teacher_patch_tokens`` (B, N, K), ``student_masks_flat`` (B, N) bool."""
        loss = torch.sum(teacher_patch_tokens * F.log_softmax(student_patch_tokens / self.student_temp, dim=-1),
                         dim=-1)  # (B, N)
        masks = student_masks_flat
        loss = torch.sum(loss * masks.float(), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)  # (B,)
        return -loss.mean()

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        """Gathered form: (M, K) student and teacher prototypes of the masked tokens, in the
        order of ``student_masks_flat`` (B, N) bool's nonzero entries."""
        s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)  # (M,)
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                            .expand_as(student_masks_flat)[student_masks_flat])  # (M,)
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Start updating the centre with (T, N, K) teacher logits: the mean over N, summed over T
        and divided by T (DINOv2 passes its M masked tokens as one (1, M, K) row)."""
        self._start_center_update(torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True),
                                  len(teacher_patch_tokens))


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2018): ``-mean log d_nn``.

    The features are L2-normalised; ``d_nn`` is each one's distance to its nearest
    neighbour within the batch (of this process). Computed in float32 outside autocast.
    """

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    @staticmethod
    def pairwise_NNs_inner(x: torch.Tensor) -> torch.Tensor:  # noqa: N802  (the reference's name)
        """Index of each row's nearest neighbour among the other rows of L2-normalised (B, D) ``x``."""
        dots = torch.mm(x, x.t())  # (B, B)
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # never oneself
        return torch.max(dots, dim=1).indices  # (B,)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``student_output`` (B, D) -> scalar."""
        with torch.autocast(student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            neighbours = self.pairwise_NNs_inner(x)
            distances = self.pdist(x, x[neighbours])  # (B,)
            return -torch.log(distances + eps).mean()
